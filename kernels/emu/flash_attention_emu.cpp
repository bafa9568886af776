// Runs kernels/cuda/flash_attention.cu on the host, to check its indexing,
// masking, tiling and synchronisation where there is no GPU (NVRTC only
// proves that it compiles). Every CUDA thread is an OS thread; __syncthreads,
// __syncwarp and the shuffles are barriers; a wmma fragment is held whole by
// every lane, its accumulator elements in a scrambled order (code that
// assumed an element order fails), with the documented load/store/mma
// semantics (operands must be TF32-rounded, pointers 32-byte aligned, or it
// aborts). It cannot find warp-level races or the hardware's own rounding —
// the GPU check group "flash attention" does. Shared memory starts as NaNs:
// a read of an unwritten value shows up. Compared with an f64 reference of
// the same attention (out, lse, dq, dk, dv); a write past the shared memory
// the launcher sizes aborts. With -fsanitize=address (2.5 minutes) global
// reads and writes out of bounds abort too (clean on 2026-11-29).
//
//   g++ -std=c++20 -O2 -pthread -w -Ikernels/emu/include \
//       kernels/emu/flash_attention_emu.cpp -o /tmp/flash-emu && /tmp/flash-emu
//
// About 1.5 minutes on two cores. include/mma.h is empty: the wmma emulation
// below stands in for CUDA's.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <thread>
#include <vector>
#include <algorithm>

#include "cuda_host.h"
// The kernels' dynamic shared memory (`extern __shared__ fa_smem[]`) is this one buffer.
#define __shared__
struct float4 { float x, y, z, w; };
static float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

alignas(128) float fa_smem[1 << 17];

static float warp_sum(float v) { for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o); return v; }
static float warp_max(float v) { for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o)); return v; }

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename L = void> struct fragment;
template <int M, int N, int K, typename T, typename L> struct fragment<matrix_a, M, N, K, T, L> {
    static constexpr int num_elements = M * K; float x[M * K]; };
template <int M, int N, int K, typename T, typename L> struct fragment<matrix_b, M, N, K, T, L> {
    static constexpr int num_elements = K * N; float x[K * N]; };
template <int M, int N, int K, typename T> struct fragment<accumulator, M, N, K, T, void> {
    static constexpr int num_elements = M * N; float x[M * N]; };
static float __float_to_tf32(float f) {
    uint32_t b; std::memcpy(&b, &f, 4);
    if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;
    std::memcpy(&f, &b, 4); return f;
}
static void check_aligned(const float* p) {  // wmma wants 256-bit aligned pointers
    if (reinterpret_cast<uintptr_t>(p) % 32) { std::fprintf(stderr, "misaligned wmma pointer\n"); std::abort(); }
}
template <int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<matrix_a, M, N, K, T, L>& f, const float* p, unsigned ld) {
    check_aligned(p); __syncwarp();
    for (int m = 0; m < M; ++m) for (int k = 0; k < K; ++k)
        f.x[m * K + k] = std::is_same<L, row_major>::value ? p[m * ld + k] : p[m + k * ld];
}
template <int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<matrix_b, M, N, K, T, L>& f, const float* p, unsigned ld) {
    check_aligned(p); __syncwarp();
    for (int k = 0; k < K; ++k) for (int n = 0; n < N; ++n)
        f.x[k * N + n] = std::is_same<L, row_major>::value ? p[k * ld + n] : p[k + n * ld];
}
// Accumulator elements in a scrambled order (element (m, n) at x[acc_at(m, n)]),
// as wmma leaves the order unspecified: code that assumed one fails here.
static int acc_at(int m, int n) { return ((m * 16 + n) * 37 + 11) % 256; }
template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ld, layout_t l) {
    check_aligned(p); if (l != mem_row_major) std::abort(); __syncwarp();
    for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) f.x[acc_at(m, n)] = p[m * ld + n];
}
template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld, layout_t l) {
    check_aligned(p); if (l != mem_row_major) std::abort(); __syncwarp();
    if (threadIdx.x % 32 == 0)
        for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) p[m * ld + n] = f.x[acc_at(m, n)];
    __syncwarp();
}
template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) { for (auto& x : f.x) x = v; }
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
    for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
        // Inputs must already be TF32 (the kernel rounds them).
        float s = c.x[acc_at(m, n)];
        for (int k = 0; k < K; ++k) {
            if (__float_to_tf32(a.x[m * K + k]) != a.x[m * K + k] || __float_to_tf32(b.x[k * N + n]) != b.x[k * N + n]) {
                std::fprintf(stderr, "unrounded operand\n"); std::abort(); }
            s += a.x[m * K + k] * b.x[k * N + n];
        }
        d.x[acc_at(m, n)] = s;
    }
}
}}  // namespace nvcuda::wmma

#include "../cuda/flash_attention.cu"

// `smem_floats`: the dynamic shared memory the launcher (flash_attention.rs)
// gives the kernel; whatever lies past it must be untouched after a block.
static void launch(unsigned gx, unsigned gy, unsigned gz, unsigned threads, size_t smem_floats,
                   const std::function<void()>& body) {
    blockDim = {threads, 1, 1}; gridDim = {gx, gy, gz};
    for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        std::memset(fa_smem, 0xff, sizeof fa_smem);  // NaN garbage: reads of unwritten smem show up
        run_block(threads, body);
        for (size_t i = smem_floats; i < sizeof fa_smem / sizeof(float); ++i) {
            uint32_t bits;
            std::memcpy(&bits, &fa_smem[i], 4);
            if (bits != 0xffffffffu) { std::fprintf(stderr, "shared memory written past the launch's %zu floats at %zu\n", smem_floats, i); std::abort(); }
        }
    }
}

struct Shape { int B, T, H, KV, D; };

static double max_abs(const std::vector<double>& v) { double m = 0; for (double x : v) m = std::max(m, std::fabs(x)); return m; }

static bool compare(const char* what, const std::vector<float>& got, const std::vector<double>& want, double frac, double atol = 0) {
    double scale = max_abs(want), worst = 0; size_t at = 0; bool nan = false;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isnan(got[i])) nan = true;
        double e = std::fabs(got[i] - want[i]);
        if (e > worst) { worst = e; at = i; }
    }
    // A floor for the attention-only parts that are 0 in exact arithmetic
    // (one token: dS = P (dP - D) with P = 1), where TF32 leaves ~1e-4.
    double bound = atol > 0 ? atol : frac * scale + 1e-3;
    bool ok = !nan && worst <= bound;
    std::printf("  %-4s %-10s max err %.3e at %zu (got %.6f want %.6f) bound %.3e%s\n", ok ? "ok" : "FAIL", what, worst, at,
                got.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at], bound, nan ? " NaN!" : "");
    return ok;
}

int main(int argc, char** argv) {
    std::vector<Shape> shapes = {{1, 1, 1, 1, 8}, {2, 37, 4, 2, 32}, {1, 128, 8, 1, 64}, {3, 100, 4, 4, 64},
                                 {2, 130, 8, 2, 128}, {2, 65, 4, 1, 8}, {1, 70, 2, 2, 12}, {2, 33, 2, 1, 6}};
    bool all = true;
    for (size_t shape_index = 0; shape_index < shapes.size(); ++shape_index) {
        const Shape s = shapes[shape_index];
        // Every other shape packs documents of 1 to 40 tokens in each
        // sequence (training's data.packing): a query sees keys from its
        // document's start; the others are plain causal (every start 0).
        const bool packed = shape_index % 2 == 1;
        std::printf("B%d T%d H%d/%d D%d%s\n", s.B, s.T, s.H, s.KV, s.D, packed ? " packed" : "");
        std::mt19937 rng(1234 + s.T);
        std::normal_distribution<float> nd(0.f, 1.f);
        std::vector<int> starts((size_t)s.B * s.T, 0);
        if (packed)
            for (int b = 0; b < s.B; ++b)
                for (int t = 0, start = 0; t < s.T; ++t) {
                    if (t > start && rng() % 13 == 0) start = t;
                    if (t - start >= 40) start = t;
                    starts[(size_t)b * s.T + t] = start;
                }
        const size_t qn = (size_t)s.B * s.T * s.H * s.D, kn = (size_t)s.B * s.T * s.KV * s.D;
        std::vector<float> q(qn), k(kn), v(kn), dout(qn), dq0(qn), dk0(kn), dv0(kn);
        for (auto* x : {&q, &k, &v, &dout, &dq0, &dk0, &dv0}) for (auto& e : *x) e = nd(rng);
        const int group = s.H / s.KV; const double scale = 1.0 / std::sqrt((double)s.D);
        // f64 reference
        std::vector<double> out_r(qn), lse_r((size_t)s.B * s.H * s.T), dq_r(dq0.begin(), dq0.end()), dk_r(dk0.begin(), dk0.end()), dv_r(dv0.begin(), dv0.end());
        auto qa = [&](int b, int t, int h) { return (((size_t)b * s.T + t) * s.H + h) * s.D; };
        auto ka = [&](int b, int t, int h) { return (((size_t)b * s.T + t) * s.KV + h) * s.D; };
        for (int b = 0; b < s.B; ++b) for (int h = 0; h < s.H; ++h) for (int t = 0; t < s.T; ++t) {
            const int f = starts[(size_t)b * s.T + t];
            int kh = h / group; std::vector<double> p(t + 1, 0.0); double mx = -1e300;
            for (int j = f; j <= t; ++j) { double d = 0; for (int i = 0; i < s.D; ++i) d += (double)q[qa(b,t,h)+i] * k[ka(b,j,kh)+i]; p[j] = d * scale; mx = std::max(mx, p[j]); }
            double sum = 0; for (int j = f; j <= t; ++j) { p[j] = std::exp(p[j] - mx); sum += p[j]; }
            for (int j = f; j <= t; ++j) p[j] /= sum;
            lse_r[((size_t)b * s.H + h) * s.T + t] = mx + std::log(sum);
            for (int i = 0; i < s.D; ++i) { double o = 0; for (int j = f; j <= t; ++j) o += p[j] * v[ka(b,j,kh)+i]; out_r[qa(b,t,h)+i] = o; }
            std::vector<double> dp(t + 1, 0.0); double proj = 0;
            for (int j = f; j <= t; ++j) { double d = 0; for (int i = 0; i < s.D; ++i) d += (double)dout[qa(b,t,h)+i] * v[ka(b,j,kh)+i]; dp[j] = d; proj += p[j] * d; }
            for (int j = f; j <= t; ++j) {
                double ds = p[j] * (dp[j] - proj);
                for (int i = 0; i < s.D; ++i) {
                    dq_r[qa(b,t,h)+i] += scale * ds * k[ka(b,j,kh)+i];
                    dk_r[ka(b,j,kh)+i] += scale * ds * q[qa(b,t,h)+i];
                    dv_r[ka(b,j,kh)+i] += p[j] * dout[qa(b,t,h)+i];
                }
            }
        }
        std::vector<float> out(qn, NAN), lse((size_t)s.B * s.H * s.T, NAN), delta(lse.size(), NAN);
        const float fscale = 1.0f / std::sqrt((float)s.D);
        // The launcher's shared-memory sizes (flash_attention.rs), in floats.
        const size_t ld = (s.D + 15) / 16 * 16 + 8;
        const size_t forward_smem = 128 * ld + 64 * 40 + 64, backward_smem = 4 * 32 * ld + 2 * 32 * 40 + 64;
        launch((s.T + 63) / 64, s.H, s.B, 128, forward_smem, [&] { flash_attention_forward_f32(out.data(), lse.data(), q.data(), k.data(), v.data(), starts.data(), s.T, s.H, s.KV, s.D, fscale); });
        all &= compare("out", out, out_r, 1e-2);
        all &= compare("lse", lse, lse_r, 0, 1e-2);
        int rows = s.B * s.H * s.T;
        launch((rows + 7) / 8, 1, 1, 256, 0, [&] { flash_attention_backward_delta_f32(delta.data(), dout.data(), out.data(), s.B, s.T, s.H, s.D); });
        std::vector<float> dq = dq0, dk = dk0, dv = dv0;
        launch((s.T + 31) / 32, s.KV, s.B, 128, backward_smem, [&] { flash_attention_backward_key_value_f32(dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(), delta.data(), starts.data(), s.T, s.H, s.KV, s.D, fscale); });
        launch((s.T + 31) / 32, s.H, s.B, 128, backward_smem, [&] { flash_attention_backward_query_f32(dq.data(), dout.data(), q.data(), k.data(), v.data(), lse.data(), delta.data(), starts.data(), s.T, s.H, s.KV, s.D, fscale); });
        all &= compare("dq", dq, dq_r, 1e-2);
        all &= compare("dk", dk, dk_r, 1e-2);
        all &= compare("dv", dv, dv_r, 1e-2);
        // Gradient deltas alone (the random start dominates the scale): relative to the attention part.
        std::vector<double> ddq(qn); std::vector<float> gdq(qn);
        for (size_t i = 0; i < qn; ++i) { ddq[i] = dq_r[i] - dq0[i]; gdq[i] = dq[i] - dq0[i]; }
        all &= compare("dq-only", gdq, ddq, 1e-2);
        std::vector<double> ddk(kn); std::vector<float> gdk(kn);
        for (size_t i = 0; i < kn; ++i) { ddk[i] = dk_r[i] - dk0[i]; gdk[i] = dk[i] - dk0[i]; }
        all &= compare("dk-only", gdk, ddk, 1e-2);
        std::vector<double> ddv(kn); std::vector<float> gdv(kn);
        for (size_t i = 0; i < kn; ++i) { ddv[i] = dv_r[i] - dv0[i]; gdv[i] = dv[i] - dv0[i]; }
        all &= compare("dv-only", gdv, ddv, 1e-2);
    }
    std::printf(all ? "ALL OK\n" : "SOME FAILED\n");
    return all ? 0 : 1;
}
