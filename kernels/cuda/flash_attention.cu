// Causal grouped-query attention without the [sequences, heads, T, T]
// probabilities (FlashAttention-2, Dao 2023): the same inputs and outputs as
// attention.cu (q [tokens, n_heads, head_dim], k and v [tokens, n_kv_heads,
// head_dim], token-major, read in place), but the forward pass keeps only
// lse [sequences, n_heads, T], the log-sum-exp of each row's scaled scores,
// and the backward pass recomputes the probabilities tile by tile from it.
// Query head h reads kv head h / (n_heads / n_kv_heads); scale = 1/sqrt(d).
//
// Products run on tensor cores as wmma TF32 fragments (m16n16k8, inputs
// rounded with __float_to_tf32, f32 accumulation); the softmax and every
// sum outside the fragments are f32. The outputs (O, dK, dV, dQ) stay in
// accumulator fragments in registers for a block's whole loop; the one
// per-row operation on them (the online softmax's rescale of O) finds each
// element's row from a row map, see the forward kernel.
//
// starts [sequences * T]: each token's document start in its sequence
// (packed sequences); a query sees keys from there to itself, 0 to itself
// when every entry is 0. Non-decreasing along a sequence (documents follow
// one another), so a tile's first row has its smallest start: key tiles
// wholly before it are skipped, which makes a sequence of short documents
// cost about their own attention, not the whole sequence's.
//
// Tiles are staged in shared memory as [rows][ld] with the head dimension
// zero-padded to a multiple of 16 (dp) and 8 floats of padding per row
// (ld = dp + 8) against bank conflicts; rows past the sequence's end are
// zeros and masked out of the softmax. Any head_dim up to 128 works (the
// launcher sizes the dynamic shared memory from dp; worker/src/cuda/
// flash_attention.rs mirrors the layouts below).
#include <mma.h>
using namespace nvcuda;

#define FA_THREADS 128  // four warps
#define FA_PAD 8
// The largest head_dim: O's fragments and the backward's are sized for it.
#define FA_MAX_DIM 128
// Forward: 64 query rows per block (16 per warp), key tiles of 32, so that
// the q, k, v and score tiles (78 KiB at head_dim 128) let two blocks share
// an SM on an A100 or H100.
#define FA_FWD_Q 64
#define FA_FWD_K 32
// Backward: 32 x 32 tiles, one 16 x 16 score tile per warp, the [32][dp]
// outputs dealt round the warps as register fragments (FA_BWD_FRAGS each);
// four [32][ld] tiles staged, 78 KiB at head_dim 128: two blocks an SM.
#define FA_BWD 32
#define FA_BWD_FRAGS (2 * (FA_MAX_DIM / 16) / (FA_THREADS / 32))
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> FaA;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> FaAt;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> FaB;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> FaBt;
typedef wmma::fragment<wmma::accumulator, 16, 16, 8, float> FaC;

// Loads a TF32 operand fragment from shared memory and rounds its elements
// (the tensor cores would otherwise drop the low mantissa bits unrounded).
template <typename Frag>
__device__ __forceinline__ void fa_load(Frag& f, const float* p, unsigned ld) {
    wmma::load_matrix_sync(f, p, ld);
#pragma unroll
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
}

__device__ __forceinline__ int fa_padded_dim(int head_dim) { return (head_dim + 15) & ~15; }

// dst[r][0..dp) = rows row0 + r of head `head` in the token-major tensor
// src [sequences * seq_len, heads, head_dim], sequence b; zeros past the
// sequence's end and past head_dim. 16-byte loads when rows allow them.
__device__ void fa_load_tile(float* dst, int ld, const float* src, int b, int row0, int rows, int seq_len,
                             int heads, int head, int head_dim, int dp) {
    if ((head_dim & 3) == 0) {
        const int quads = dp >> 2;
        for (int i = threadIdx.x; i < rows * quads; i += blockDim.x) {
            const int r = i / quads, c = (i - r * quads) << 2, t = row0 + r;
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (t < seq_len && c < head_dim)
                x = *reinterpret_cast<const float4*>(src + (((size_t)b * seq_len + t) * heads + head) * head_dim + c);
            *reinterpret_cast<float4*>(dst + r * ld + c) = x;
        }
    } else {
        for (int i = threadIdx.x; i < rows * dp; i += blockDim.x) {
            const int r = i / dp, c = i - r * dp, t = row0 + r;
            dst[r * ld + c] =
                t < seq_len && c < head_dim ? src[(((size_t)b * seq_len + t) * heads + head) * head_dim + c] : 0.0f;
        }
    }
}

// One block per (query tile, head, sequence), the last query tiles (the
// longest rows) first; each warp owns 16 query rows and keeps their output
// O in registers (dp/16 accumulator fragments). Per key tile: S = Q K^T for
// the warp's rows (through shared memory), the online softmax (running max
// m and sum l per row, in log2 units), O scaled row by row by
// exp2(m_old - m_new), then O += P V. out = O / l, lse = ln(l) + m.
//
// wmma does not say which row an accumulator element holds, so the kernel
// asks it: a fragment loaded from a 16 x 16 tile whose every element is its
// row index holds, in element e, the row of element e of every fragment of
// that type (load, store and mma_sync share one layout).
extern "C" __global__ void flash_attention_forward_f32(float* out, float* lse, const float* q, const float* k,
                                                       const float* v, const int* starts, int seq_len,
                                                       int n_heads, int n_kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(128) float fa_smem[];
    const int dp = fa_padded_dim(head_dim), ld = dp + FA_PAD, ls = FA_FWD_K + FA_PAD;
    float* qs = fa_smem;                 // [FA_FWD_Q][ld]; at the end, each warp's O rows
    float* ks = qs + FA_FWD_Q * ld;      // [FA_FWD_K][ld]
    float* vs = ks + FA_FWD_K * ld;      // [FA_FWD_K][ld]
    float* ss = vs + FA_FWD_K * ld;      // [FA_FWD_Q][ls], scores then probabilities
    float* row_s = ss + FA_FWD_Q * ls;   // [FA_FWD_Q]: each row's rescale factor, at the end its sum

    const int tiles = (seq_len + FA_FWD_Q - 1) / FA_FWD_Q;
    const int tile = tiles - 1 - (int)blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kv_head = h / (n_heads / n_kv_heads);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r0 = warp * 16;
    const int q0 = tile * FA_FWD_Q;
    const int n_tiles = dp >> 4;
    const float scale_log2 = scale * FA_LOG2E;

    fa_load_tile(qs, ld, q, b, q0, FA_FWD_Q, seq_len, n_heads, h, head_dim, dp);
    // The accumulator's row map, from the warp's own score rows.
    for (int i = lane; i < 16 * 16; i += 32) ss[(r0 + i / 16) * ls + i % 16] = (float)(i / 16);
    __syncwarp();
    FaC rows;
    wmma::load_matrix_sync(rows, ss + r0 * ls, ls, wmma::mem_row_major);
    FaC o[FA_MAX_DIM / 16];
#pragma unroll
    for (int n = 0; n < FA_MAX_DIM / 16; ++n) wmma::fill_fragment(o[n], 0.0f);

    // The softmax's lanes: a pair per row of the warp, half the key tile each.
    const int row = lane >> 1, half = lane & 1, t = q0 + r0 + row;
    const int first = t < seq_len ? starts[(size_t)b * seq_len + t] : 0;
    float m = -INFINITY, l = 0.0f;
    // Keys past the tile's last row are above every row's diagonal; keys
    // before its first row's document start are before every row's.
    const int key_tiles = (min(seq_len, q0 + FA_FWD_Q) - 1) / FA_FWD_K + 1;
    const int first_key_tile = starts[(size_t)b * seq_len + min(q0, seq_len - 1)] / FA_FWD_K;
    for (int kt = first_key_tile; kt < key_tiles; ++kt) {
        const int k0 = kt * FA_FWD_K;
        __syncthreads();  // every warp is done with the previous ks, vs (and the row map's tile)
        fa_load_tile(ks, ld, k, b, k0, FA_FWD_K, seq_len, n_kv_heads, kv_head, head_dim, dp);
        fa_load_tile(vs, ld, v, b, k0, FA_FWD_K, seq_len, n_kv_heads, kv_head, head_dim, dp);
        __syncthreads();

        {
            FaC acc[FA_FWD_K / 16];
#pragma unroll
            for (int n = 0; n < FA_FWD_K / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
            for (int kk = 0; kk < dp; kk += 8) {
                FaA a;
                fa_load(a, qs + r0 * ld + kk, ld);
#pragma unroll
                for (int n = 0; n < FA_FWD_K / 16; ++n) {
                    FaBt kt_frag;  // K^T: (k, n) at ks[n * ld + k]
                    fa_load(kt_frag, ks + n * 16 * ld + kk, ld);
                    wmma::mma_sync(acc[n], a, kt_frag, acc[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < FA_FWD_K / 16; ++n)
                wmma::store_matrix_sync(ss + r0 * ls + n * 16, acc[n], ls, wmma::mem_row_major);
        }
        __syncwarp();

        // The online softmax. Masked scores are -inf; a row with no key yet
        // (only padding rows past the end) keeps m = -inf and uses 0 as its
        // reference, so that no inf - inf appears.
        {
            const int half_width = FA_FWD_K / 2;
            float* srow = ss + (r0 + row) * ls + half * half_width;
            float s[FA_FWD_K / 2], mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < half_width; ++c) {
                const int key = k0 + half * half_width + c;
                s[c] = t < seq_len && key >= first && key <= t ? srow[c] * scale_log2 : -INFINITY;
                mx = fmaxf(mx, s[c]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            const float m_new = fmaxf(m, mx);
            const float ref = m_new == -INFINITY ? 0.0f : m_new;
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < half_width; ++c) {
                const float p = exp2f(s[c] - ref);
                srow[c] = p;
                sum += p;
            }
            sum += __shfl_xor_sync(FULL_MASK, sum, 1);
            const float alpha = exp2f(m - ref);
            l = l * alpha + sum;
            m = m_new;
            if (half == 0) row_s[r0 + row] = alpha;
        }
        __syncwarp();

        // O rows rescaled in registers, then O += P V.
        {
            float alpha_e[FaC::num_elements];
#pragma unroll
            for (int e = 0; e < FaC::num_elements; ++e) alpha_e[e] = row_s[r0 + (int)rows.x[e]];
#pragma unroll
            for (int n = 0; n < FA_MAX_DIM / 16; ++n)
                if (n < n_tiles)
#pragma unroll
                    for (int e = 0; e < FaC::num_elements; ++e) o[n].x[e] *= alpha_e[e];
        }
#pragma unroll
        for (int kk = 0; kk < FA_FWD_K; kk += 8) {
            FaA a;
            fa_load(a, ss + r0 * ls + kk, ls);
#pragma unroll
            for (int n = 0; n < FA_MAX_DIM / 16; ++n) {
                if (n < n_tiles) {
                    FaB bv;
                    fa_load(bv, vs + kk * ld + n * 16, ld);
                    wmma::mma_sync(o[n], a, bv, o[n]);
                }
            }
        }
    }

    // O out through the warp's own q rows, which nothing reads any more.
    __syncwarp();
#pragma unroll
    for (int n = 0; n < FA_MAX_DIM / 16; ++n)
        if (n < n_tiles) wmma::store_matrix_sync(qs + r0 * ld + n * 16, o[n], ld, wmma::mem_row_major);
    if (half == 0) {
        row_s[r0 + row] = l;
        if (t < seq_len) lse[((size_t)b * n_heads + h) * seq_len + t] = (m + log2f(l)) * FA_LN2;
    }
    __syncwarp();
    for (int r = 0; r < 16; ++r) {
        const int tr = q0 + r0 + r;
        if (tr >= seq_len) break;  // the same for the whole warp
        const float inv = 1.0f / row_s[r0 + r];
        float* o_row = out + (((size_t)b * seq_len + tr) * n_heads + h) * head_dim;
        for (int d = lane; d < head_dim; d += 32) o_row[d] = qs[(r0 + r) * ld + d] * inv;
    }
}

// The backward pass's row term D = rowsum(dout * out), one warp per row
// (sequence b, head h, position t), stored [sequences, n_heads, T] like lse.
// dS = P * (dP - D) needs it for every tile of the row.
extern "C" __global__ void flash_attention_backward_delta_f32(float* delta, const float* dout, const float* out,
                                                              int sequences, int seq_len, int n_heads,
                                                              int head_dim) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)sequences * n_heads * seq_len) return;
    const int t = (int)(row % seq_len);
    const int h = (int)((row / seq_len) % n_heads);
    const size_t b = row / ((size_t)seq_len * n_heads);
    const size_t at = ((b * seq_len + t) * n_heads + h) * head_dim;
    float sum = 0.0f;
    for (int d = lane; d < head_dim; d += 32) sum += dout[at + d] * out[at + d];
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

// c[32][ls] = a[32][dp] b[32][dp]^T (scores q k^T or dP = dout v^T), one
// 16 x 16 tile per warp.
__device__ __forceinline__ void fa_products_abt(float* c, int ls, const float* a, const float* bm, int ld, int dp) {
    const int warp = threadIdx.x >> 5;
    const int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 16;
    FaC acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < dp; kk += 8) {
        FaA x;
        FaBt y;
        fa_load(x, a + m0 * ld + kk, ld);
        fa_load(y, bm + n0 * ld + kk, ld);
        wmma::mma_sync(acc, x, y, acc);
    }
    wmma::store_matrix_sync(c + m0 * ls + n0, acc, ls, wmma::mem_row_major);
}

// Scores s[r][c] (query row q0 + r, key k0 + c) to probabilities
// P = exp(scale s - lse) in place, and dp[r][c] to dS = P (dP - D); both 0
// above the diagonal, before the row's document start (`starts`: the
// sequence's) and past the end. lse_s is in log2 units.
__device__ __forceinline__ void fa_softmax_backward_tile(float* s, float* dp, int ls, const float* lse_s,
                                                         const float* delta_s, const int* starts, int q0, int k0,
                                                         int seq_len, float scale_log2) {
    for (int i = threadIdx.x; i < FA_BWD * FA_BWD; i += blockDim.x) {
        const int r = i / FA_BWD, c = i % FA_BWD, t = q0 + r;
        float p = 0.0f, ds = 0.0f;
        if (t < seq_len && k0 + c <= t && k0 + c >= starts[t]) {
            p = exp2f(s[r * ls + c] * scale_log2 - lse_s[r]);
            ds = p * (dp[r * ls + c] - delta_s[r]);
        }
        s[r * ls + c] = p;
        dp[r * ls + c] = ds;
    }
}

// A [32][dp] output in registers: tile warp + 4 i (m-tile tile & 1, n-tile
// tile >> 1) in acc[i]. Plain sums, so the fragments' layout never matters.
__device__ __forceinline__ void fa_zero(FaC* acc) {
#pragma unroll
    for (int i = 0; i < FA_BWD_FRAGS; ++i) wmma::fill_fragment(acc[i], 0.0f);
}

// acc += op(x) y with x [32][ls] (op: transposed when TRANSPOSE) and
// y [32][ld].
template <bool TRANSPOSE>
__device__ __forceinline__ void fa_accumulate(FaC* acc, const float* x, int ls, const float* y, int ld, int dp) {
    const int warp = threadIdx.x >> 5;
    const int tiles = 2 * (dp >> 4);
#pragma unroll
    for (int i = 0; i < FA_BWD_FRAGS; ++i) {
        const int tile = warp + (FA_THREADS / 32) * i;
        if (tile >= tiles) break;
        const int m0 = (tile & 1) * 16, n0 = (tile >> 1) * 16;
#pragma unroll
        for (int kk = 0; kk < FA_BWD; kk += 8) {
            FaB yb;
            fa_load(yb, y + kk * ld + n0, ld);
            if (TRANSPOSE) {
                FaAt xa;  // x^T: (m, k) at x[k * ls + m]
                fa_load(xa, x + kk * ls + m0, ls);
                wmma::mma_sync(acc[i], xa, yb, acc[i]);
            } else {
                FaA xa;
                fa_load(xa, x + m0 * ls + kk, ls);
                wmma::mma_sync(acc[i], xa, yb, acc[i]);
            }
        }
    }
}

// The register tiles to dst [32][ld] (each warp its own tiles).
__device__ __forceinline__ void fa_store(float* dst, int ld, const FaC* acc, int dp) {
    const int warp = threadIdx.x >> 5;
    const int tiles = 2 * (dp >> 4);
#pragma unroll
    for (int i = 0; i < FA_BWD_FRAGS; ++i) {
        const int tile = warp + (FA_THREADS / 32) * i;
        if (tile >= tiles) break;
        wmma::store_matrix_sync(dst + (tile & 1) * 16 * ld + (tile >> 1) * 16, acc[i], ld, wmma::mem_row_major);
    }
}

// lse (to log2 units) and D for query rows q0.. of head h; 0 past the end.
__device__ __forceinline__ void fa_load_row_terms(float* lse_s, float* delta_s, const float* lse,
                                                  const float* delta, int b, int h, int q0, int n_heads,
                                                  int seq_len) {
    if (threadIdx.x < FA_BWD) {
        const int t = q0 + threadIdx.x;
        const size_t at = ((size_t)b * n_heads + h) * seq_len + t;
        lse_s[threadIdx.x] = t < seq_len ? lse[at] * FA_LOG2E : 0.0f;
        delta_s[threadIdx.x] = t < seq_len ? delta[at] : 0.0f;
    }
}

// dk += scale sum dS^T q and dv += sum P^T dout, one block per (key tile,
// kv head, sequence), early key tiles (the most query tiles) first: over
// the group's query heads in order, then the query tiles at and after the
// key tile. The block is the only writer of its dk and dv rows, so the sums
// are deterministic without atomics.
extern "C" __global__ void flash_attention_backward_key_value_f32(float* dk, float* dv, const float* dout, const float* q, const float* k,
                                           const float* v, const float* lse, const float* delta, const int* starts,
                                           int seq_len, int n_heads, int n_kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(128) float fa_smem[];
    const int dp = fa_padded_dim(head_dim), ld = dp + FA_PAD, ls = FA_BWD + FA_PAD;
    float* ks = fa_smem;            // [FA_BWD][ld] each
    float* vs = ks + FA_BWD * ld;
    float* qs = vs + FA_BWD * ld;   // at the end: dk
    float* dos = qs + FA_BWD * ld;  // at the end: dv
    float* ss = dos + FA_BWD * ld;  // [FA_BWD][ls]: scores, then P
    float* dps = ss + FA_BWD * ls;  // [FA_BWD][ls]: dP, then dS
    float* lse_s = dps + FA_BWD * ls;
    float* delta_s = lse_s + FA_BWD;

    const int tiles = (seq_len + FA_BWD - 1) / FA_BWD;
    const int tile = blockIdx.x;
    const int kv_head = blockIdx.y, b = blockIdx.z;
    const int group = n_heads / n_kv_heads;
    const int k0 = tile * FA_BWD;
    const float scale_log2 = scale * FA_LOG2E;

    fa_load_tile(ks, ld, k, b, k0, FA_BWD, seq_len, n_kv_heads, kv_head, head_dim, dp);
    fa_load_tile(vs, ld, v, b, k0, FA_BWD, seq_len, n_kv_heads, kv_head, head_dim, dp);
    FaC dk_acc[FA_BWD_FRAGS], dv_acc[FA_BWD_FRAGS];
    fa_zero(dk_acc);
    fa_zero(dv_acc);
    // The query tiles that see a key of this tile: from the diagonal on,
    // up to the first whose first row's document starts after its last key.
    int last_query_tile = tile;
    while (last_query_tile + 1 < tiles &&
           starts[(size_t)b * seq_len + (last_query_tile + 1) * FA_BWD] <= k0 + FA_BWD - 1)
        ++last_query_tile;
    for (int h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        for (int qt = tile; qt <= last_query_tile; ++qt) {
            const int q0 = qt * FA_BWD;
            __syncthreads();  // the previous products are done with qs, dos, ss, dps
            fa_load_tile(qs, ld, q, b, q0, FA_BWD, seq_len, n_heads, h, head_dim, dp);
            fa_load_tile(dos, ld, dout, b, q0, FA_BWD, seq_len, n_heads, h, head_dim, dp);
            fa_load_row_terms(lse_s, delta_s, lse, delta, b, h, q0, n_heads, seq_len);
            __syncthreads();
            fa_products_abt(ss, ls, qs, ks, ld, dp);
            fa_products_abt(dps, ls, dos, vs, ld, dp);
            __syncthreads();
            fa_softmax_backward_tile(ss, dps, ls, lse_s, delta_s, starts + (size_t)b * seq_len, q0, k0, seq_len,
                                     scale_log2);
            __syncthreads();
            fa_accumulate<true>(dv_acc, ss, ls, dos, ld, dp);
            fa_accumulate<true>(dk_acc, dps, ls, qs, ld, dp);
        }
    }
    __syncthreads();  // every warp is done with qs and dos
    fa_store(qs, ld, dk_acc, dp);
    fa_store(dos, ld, dv_acc, dp);
    __syncthreads();
    for (int i = threadIdx.x; i < FA_BWD * head_dim; i += blockDim.x) {
        const int r = i / head_dim, d = i - r * head_dim, j = k0 + r;
        if (j >= seq_len) break;  // rows only grow with i
        const size_t at = (((size_t)b * seq_len + j) * n_kv_heads + kv_head) * head_dim + d;
        dk[at] += scale * qs[r * ld + d];
        dv[at] += dos[r * ld + d];
    }
}

// dq += scale sum dS k, one block per (query tile, head, sequence), the
// last query tiles (the most key tiles) first, over the key tiles up to the
// diagonal. The only writer of its dq rows.
extern "C" __global__ void flash_attention_backward_query_f32(float* dq, const float* dout, const float* q, const float* k, const float* v,
                                       const float* lse, const float* delta, const int* starts, int seq_len,
                                       int n_heads, int n_kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(128) float fa_smem[];
    const int dp = fa_padded_dim(head_dim), ld = dp + FA_PAD, ls = FA_BWD + FA_PAD;
    float* qs = fa_smem;            // [FA_BWD][ld] each; at the end: dq
    float* dos = qs + FA_BWD * ld;
    float* ks = dos + FA_BWD * ld;
    float* vs = ks + FA_BWD * ld;
    float* ss = vs + FA_BWD * ld;   // [FA_BWD][ls]: scores, then P
    float* dps = ss + FA_BWD * ls;  // [FA_BWD][ls]: dP, then dS
    float* lse_s = dps + FA_BWD * ls;
    float* delta_s = lse_s + FA_BWD;

    const int tiles = (seq_len + FA_BWD - 1) / FA_BWD;
    const int tile = tiles - 1 - (int)blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kv_head = h / (n_heads / n_kv_heads);
    const int q0 = tile * FA_BWD;
    const float scale_log2 = scale * FA_LOG2E;

    fa_load_tile(qs, ld, q, b, q0, FA_BWD, seq_len, n_heads, h, head_dim, dp);
    fa_load_tile(dos, ld, dout, b, q0, FA_BWD, seq_len, n_heads, h, head_dim, dp);
    fa_load_row_terms(lse_s, delta_s, lse, delta, b, h, q0, n_heads, seq_len);
    FaC dq_acc[FA_BWD_FRAGS];
    fa_zero(dq_acc);
    for (int kt = starts[(size_t)b * seq_len + q0] / FA_BWD; kt <= tile; ++kt) {
        const int k0 = kt * FA_BWD;
        __syncthreads();  // the previous products are done with ks, vs, dps
        fa_load_tile(ks, ld, k, b, k0, FA_BWD, seq_len, n_kv_heads, kv_head, head_dim, dp);
        fa_load_tile(vs, ld, v, b, k0, FA_BWD, seq_len, n_kv_heads, kv_head, head_dim, dp);
        __syncthreads();
        fa_products_abt(ss, ls, qs, ks, ld, dp);
        fa_products_abt(dps, ls, dos, vs, ld, dp);
        __syncthreads();
        fa_softmax_backward_tile(ss, dps, ls, lse_s, delta_s, starts + (size_t)b * seq_len, q0, k0, seq_len,
                                 scale_log2);
        __syncthreads();
        fa_accumulate<false>(dq_acc, dps, ls, ks, ld, dp);
    }
    __syncthreads();  // every warp is done with qs
    fa_store(qs, ld, dq_acc, dp);
    __syncthreads();
    for (int i = threadIdx.x; i < FA_BWD * head_dim; i += blockDim.x) {
        const int r = i / head_dim, d = i - r * head_dim, t = q0 + r;
        if (t >= seq_len) break;
        dq[(((size_t)b * seq_len + t) * n_heads + h) * head_dim + d] += scale * qs[r * ld + d];
    }
}
