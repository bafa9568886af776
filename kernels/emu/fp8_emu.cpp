// Runs kernels/cuda/fp8.cu's quantisers on the host, to check the indexing
// of the FP8 GEMM operands where there is no GPU (NVRTC only proves that
// they compile): each new kernel against a kernel the H200 already held bit
// for bit to the CPU's Fp8Matrix, launched as worker/src/cuda/fp8.rs
// launches them.
// - fp8_quantize_1x128_t_f32 (a stored [k, m] matrix's transpose in 1x128
//   tiles, K-major, padded) against fp8_quantize_128x1_f32 of the same matrix;
// - fp8_quantize_128x128_t_f32 against fp8_quantize_128x128_f32, transposed;
// - fp8_quantize_1x128_f32 and fp8_quantize_128x128_f32 with padded codes,
//   padded rows and cuBLASLt's scale layouts against their unpadded output;
// - fp8_unpad_rows_f32 against a plain loop;
// - the tensorwise recipe: both 1x128 quantisers with one given scale, and
//   fp8_amax_f32, fp8_delayed_scale_f32 and fp8_advance_histories against
//   worker/src/fp8/delayed.rs's rules written out.
// Codes and scales must be equal, padding zero. Every CUDA thread is an OS
// thread (include/cuda_host.h); shared memory is static, one block at a time.
//
//   g++ -std=c++20 -O2 -pthread -w -Ikernels/emu/include \
//       kernels/emu/fp8_emu.cpp -o /tmp/fp8-emu && /tmp/fp8-emu
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_host.h"
#define __shared__ static
#include "../cuda/common.cuh"
#include "../cuda/fp8.cu"

static int failures = 0;

template <typename T>
static void expect_equal(const char* what, const char* shape, const std::vector<T>& got, const std::vector<T>& want) {
    size_t bad = got.size() == want.size() ? 0 : 1, first = 0;
    for (size_t i = 0; i < got.size() && i < want.size(); ++i)
        if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && bad++ == 0) first = i;
    std::printf("  %-4s %-34s %s: %zu values%s\n", bad ? "FAIL" : "ok", what, shape, want.size(),
                bad ? (" (first difference at " + std::to_string(first) + ")").c_str() : "");
    failures += bad != 0;
}

static void launch(unsigned gx, unsigned gy, unsigned threads, const std::function<void()>& body) {
    launch_grid({gx, gy, 1}, threads, [] {}, body);
}

static int up(int n, int to) { return (n + to - 1) / to * to; }

// Checks padded K-major codes `[padded_rows, stride]` of an operand
// `[rows, cols]`: each code (r, c) against `want(r, c)`, every other code zero.
template <typename Want>
static void expect_codes(const std::string& name, const char* shape, const std::vector<unsigned char>& codes,
                         int padded_rows, int stride, int rows, int cols, Want want) {
    std::vector<unsigned char> got, wanted, pad;
    for (int r = 0; r < padded_rows; ++r)
        for (int c = 0; c < stride; ++c) {
            const unsigned char code = codes[(size_t)r * stride + c];
            if (r < rows && c < cols) got.push_back(code), wanted.push_back(want(r, c));
            else pad.push_back(code);
        }
    expect_equal((name + " codes").c_str(), shape, got, wanted);
    expect_equal((name + " padding").c_str(), shape, pad, std::vector<unsigned char>(pad.size(), 0));
}

static void check(bool ok, const char* what, const char* detail) {
    std::printf("  %-4s %-34s %s\n", ok ? "ok" : "FAIL", what, detail);
    failures += !ok;
}

// The tensorwise recipe's state on the device against worker/src/fp8/delayed.rs
// written out: amax over a grid (NaN dropped, infinity kept), the delayed
// scale and the observation, and the end of a step.
static void delayed_scaling(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    char detail[96];
    for (const int poison : {0, 1, 2}) {  // none, a NaN, an infinity
        std::vector<float> x(5000);
        for (auto& v : x) v = 3.0f * normal(rng);
        if (poison == 1) x[4321] = NAN;
        if (poison == 2) x[17] = -INFINITY;
        float want = 0.0f;
        for (const float v : x) want = std::fmax(want, std::fabs(v));
        unsigned bits = 0;
        launch(7, 1, 256, [&] { fp8_amax_f32(&bits, x.data(), x.size()); });
        std::snprintf(detail, sizeof detail, "5000 values, %s: %g", poison == 0 ? "finite" : poison == 1 ? "a NaN" : "an infinity", __uint_as_float(bits));
        check(bits == __float_as_uint(want), "amax", detail);
    }
    // Scale: from the history's max when there is one, else the current
    // amax; observed only finite positive amaxes, never lowered.
    struct Case { std::vector<float> history; float current; float observed; };
    const Case cases[] = {{{}, 2.5f, 0.0f}, {{1.0f, 8.0f, 3.0f}, 2.5f, 9.0f}, {{4.0f}, INFINITY, 1.0f}, {{}, 0.0f, 0.0f}};
    for (const auto& c : cases) {
        std::vector<float> history(FP8_HISTORY_LEN, NAN);
        std::copy(c.history.begin(), c.history.end(), history.begin());
        const int length = (int)c.history.size();
        unsigned observed = __float_as_uint(c.observed), current = __float_as_uint(c.current);
        float scale = NAN;
        launch(1, 1, 32, [&] { fp8_delayed_scale_f32(&scale, &observed, history.data(), &length, &current); });
        float from = c.current;
        if (length > 0) from = *std::max_element(c.history.begin(), c.history.end());
        const float want_scale = from > 0.0f && std::isfinite(from) ? std::fmax(from / 448.0f, 1.175494351e-38f) : 1.0f;
        const bool counts = std::isfinite(c.current) && c.current > 0.0f;
        const float want_observed = counts ? std::fmax(c.observed, c.current) : c.observed;
        std::snprintf(detail, sizeof detail, "%d in history, current %g: scale %g, observed %g", length, c.current, scale,
                      __uint_as_float(observed));
        check(scale == want_scale && observed == __float_as_uint(want_observed), "delayed scale", detail);
    }
    // End of step: unseen tensors keep their history; a full one drops its oldest.
    const int tensors = 40;
    std::vector<float> histories((size_t)tensors * FP8_HISTORY_LEN, NAN);
    std::vector<int> lengths(tensors);
    std::vector<unsigned> observed(tensors);
    std::vector<std::vector<float>> want(tensors);
    for (int t = 0; t < tensors; ++t) {
        lengths[t] = t % (FP8_HISTORY_LEN + 1);
        for (int i = 0; i < lengths[t]; ++i) histories[(size_t)t * FP8_HISTORY_LEN + i] = (float)(t * 100 + i);
        want[t].assign(histories.begin() + (size_t)t * FP8_HISTORY_LEN, histories.begin() + (size_t)t * FP8_HISTORY_LEN + lengths[t]);
        observed[t] = t % 3 == 0 ? 0u : __float_as_uint(0.5f + t);
        if (observed[t] != 0) {
            if ((int)want[t].size() == FP8_HISTORY_LEN) want[t].erase(want[t].begin());
            want[t].push_back(0.5f + t);
        }
    }
    launch(1, 1, 64, [&] { fp8_advance_histories(histories.data(), lengths.data(), observed.data(), tensors); });
    bool ok = true;
    for (int t = 0; t < tensors; ++t) {
        ok &= observed[t] == 0 && lengths[t] == (int)want[t].size();
        for (int i = 0; ok && i < lengths[t]; ++i) ok &= histories[(size_t)t * FP8_HISTORY_LEN + i] == want[t][i];
    }
    check(ok, "advance histories", "40 tensors, histories of 0 to 16, a third unseen");
}

int main() {
    struct Shape { int rows, cols; };
    const Shape shapes[] = {{3, 300}, {37, 130}, {130, 260}, {1, 1}, {256, 128}, {5, 256}, {200, 130}, {150, 3}};
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (const auto [rows, cols] : shapes) {
        char shape[64];
        std::snprintf(shape, sizeof shape, "%dx%d", rows, cols);
        std::vector<float> x((size_t)rows * cols);
        for (auto& v : x) v = normal(rng);
        if (rows > 2) std::fill(x.begin() + cols, x.begin() + 2 * cols, 0.0f);  // an all-zero row: scale 1
        x[0] = INFINITY;                                                           // saturates
        const int tile_cols = (cols + 127) / 128, tile_rows = (rows + 127) / 128;

        // 1x128 as stored: the unpadded kernel (row-major scales) against
        // codes padded to whole K slices, rows to 16, scales outer-major.
        {
            std::vector<unsigned char> ref_codes((size_t)rows * cols);
            std::vector<float> ref_scales((size_t)rows * tile_cols);
            launch((rows * tile_cols + 7) / 8, 1, 256, [&] {
                fp8_quantize_1x128_f32(ref_codes.data(), ref_scales.data(), x.data(), rows, cols, cols, 0, rows, nullptr);
            });
            const int stride = up(cols, 128), padded = up(rows, 16);
            std::vector<unsigned char> codes((size_t)padded * stride, 0xaa);
            std::fill(codes.begin() + (size_t)rows * stride, codes.end(), 0);  // gpu.zeros when rows are padded
            if (padded == rows) std::fill(codes.begin(), codes.end(), 0xaa);
            std::vector<float> scales((size_t)tile_cols * padded, padded > rows ? 0.0f : NAN);
            launch((rows * tile_cols + 7) / 8, 1, 256, [&] {
                fp8_quantize_1x128_f32(codes.data(), scales.data(), x.data(), rows, cols, stride, 1, padded, nullptr);
            });
            expect_codes("1x128 padded", shape, codes, padded, stride, rows, cols,
                         [&](int r, int c) { return ref_codes[(size_t)r * cols + c]; });
            std::vector<float> got_scales, want_scales;
            for (int t = 0; t < tile_cols; ++t)
                for (int r = 0; r < rows; ++r)
                    got_scales.push_back(scales[(size_t)t * padded + r]), want_scales.push_back(ref_scales[(size_t)r * tile_cols + t]);
            expect_equal("1x128 outer-major scales", shape, got_scales, want_scales);
        }

        // The transpose of x ([cols, rows], K = rows) in 1x128 tiles: x's
        // 128x1 tiles (fp8_quantize_128x1_f32), written K-major.
        {
            std::vector<unsigned char> ref_codes((size_t)rows * cols);
            std::vector<float> ref_scales((size_t)tile_rows * cols);
            launch((cols + 127) / 128, tile_rows, 128, [&] {
                fp8_quantize_128x1_f32(ref_codes.data(), ref_scales.data(), x.data(), rows, cols);
            });
            const int m = cols, k = rows, stride = up(k, 128), padded = up(m, 16), k_tiles = tile_rows;
            std::vector<unsigned char> codes((size_t)padded * stride, padded > m ? 0 : 0xaa);
            std::vector<float> scales((size_t)k_tiles * padded, padded > m ? 0.0f : NAN);
            launch((m + 31) / 32, k_tiles, 256, [&] {
                fp8_quantize_1x128_t_f32(codes.data(), scales.data(), x.data(), k, m, stride, 1, padded, nullptr);
            });
            expect_codes("1x128 transposed", shape, codes, padded, stride, m, k,
                         [&](int r, int c) { return ref_codes[(size_t)c * cols + r]; });
            std::vector<float> got_scales, want_scales;
            for (int t = 0; t < k_tiles; ++t)
                for (int r = 0; r < m; ++r)
                    got_scales.push_back(scales[(size_t)t * padded + r]), want_scales.push_back(ref_scales[(size_t)t * cols + r]);
            expect_equal("1x128 transposed scales", shape, got_scales, want_scales);
        }

        // 128x128 blocks: unpadded and row-major against padded codes and
        // cuBLASLt's scale rows (padded to 4), as stored and transposed.
        {
            std::vector<unsigned char> ref_codes((size_t)rows * cols);
            std::vector<float> ref_scales((size_t)tile_rows * tile_cols);
            launch(tile_cols, tile_rows, 256, [&] {
                fp8_quantize_128x128_f32(ref_codes.data(), ref_scales.data(), x.data(), rows, cols, cols, tile_cols);
            });
            for (const bool transposed : {false, true}) {
                const int n = transposed ? cols : rows, k = transposed ? rows : cols;
                const int stride = up(k, 128), padded = up(n, 16), k_tiles = (k + 127) / 128, n_tiles = (n + 127) / 128;
                const int scale_stride = up(k_tiles, 4);
                std::vector<unsigned char> codes((size_t)padded * stride, padded > n ? 0 : 0xaa);
                std::vector<float> scales((size_t)n_tiles * scale_stride, 0.0f);
                launch(k_tiles, n_tiles, 256, [&] {
                    if (transposed)
                        fp8_quantize_128x128_t_f32(codes.data(), scales.data(), x.data(), k, n, stride, scale_stride);
                    else
                        fp8_quantize_128x128_f32(codes.data(), scales.data(), x.data(), n, k, stride, scale_stride);
                });
                const std::string name = transposed ? "128x128 transposed" : "128x128 padded";
                expect_codes(name, shape, codes, padded, stride, n, k, [&](int r, int c) {
                    return ref_codes[transposed ? (size_t)c * cols + r : (size_t)r * cols + c];
                });
                std::vector<float> got_scales, want_scales;
                for (int i = 0; i < n_tiles; ++i)
                    for (int j = 0; j < scale_stride; ++j) {
                        got_scales.push_back(scales[(size_t)i * scale_stride + j]);
                        const size_t at = transposed ? (size_t)j * tile_cols + i : (size_t)i * tile_cols + j;
                        want_scales.push_back(j < k_tiles ? ref_scales[at] : 0.0f);
                    }
                expect_equal((name + " scales").c_str(), shape, got_scales, want_scales);
            }
        }

        // The tensorwise recipe: one given scale for every tile, as stored
        // and transposed, codes e4m3(x / scale), the tile scales untouched.
        for (const bool transposed : {false, true}) {
            const float tensor_scale = 0.37f;
            const int n = transposed ? cols : rows, k = transposed ? rows : cols;
            const int stride = up(k, 128), padded = up(n, 16), k_tiles = (k + 127) / 128;
            std::vector<unsigned char> codes((size_t)padded * stride, padded > n ? 0 : 0xaa);
            std::vector<float> scales((size_t)k_tiles * padded, NAN);
            const auto before = scales;
            if (transposed)
                launch((n + 31) / 32, k_tiles, 256, [&] {
                    fp8_quantize_1x128_t_f32(codes.data(), scales.data(), x.data(), k, n, stride, 1, padded,
                                             &tensor_scale);
                });
            else
                launch((n * k_tiles + 7) / 8, 1, 256, [&] {
                    fp8_quantize_1x128_f32(codes.data(), scales.data(), x.data(), n, k, stride, 1, padded,
                                           &tensor_scale);
                });
            const std::string name = transposed ? "tensorwise transposed" : "tensorwise";
            expect_codes(name, shape, codes, padded, stride, n, k, [&](int r, int c) {
                return encode_e4m3(x[transposed ? (size_t)c * cols + r : (size_t)r * cols + c], tensor_scale);
            });
            expect_equal((name + " tile scales untouched").c_str(), shape, scales, before);
        }

        // A GEMM result out of its padded scratch, moved or added.
        for (const int accumulate : {0, 1}) {
            const int ld = up(cols, 4) + 4;
            std::vector<float> src((size_t)rows * ld), out((size_t)rows * cols), want;
            for (auto& v : src) v = normal(rng);
            for (auto& v : out) v = normal(rng);
            want = out;
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c)
                    want[(size_t)r * cols + c] = accumulate ? out[(size_t)r * cols + c] + src[(size_t)r * ld + c] : src[(size_t)r * ld + c];
            const size_t n = (size_t)rows * cols;
            launch((unsigned)std::min<size_t>((n + 255) / 256, 65535), 1, 256, [&] {
                fp8_unpad_rows_f32(out.data(), src.data(), rows, cols, ld, accumulate);
            });
            expect_equal(accumulate ? "unpad rows, accumulate" : "unpad rows", shape, out, want);
        }
    }
    delayed_scaling(rng);
    std::printf(failures ? "SOME FAILED\n" : "ALL OK\n");
    return failures ? 1 : 0;
}
