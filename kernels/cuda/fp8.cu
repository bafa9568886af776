// E4M3 quantisation with fine-grained scales, as worker/src/fp8/quantize.rs:
// scale = max(amax / 448, FLT_MIN) (1 for an all-zero or non-finite tile),
// code = e4m3(x / scale) rounded to nearest even and saturated to +-448,
// with a true division so the codes match the CPU emulation bit for bit.

__device__ __forceinline__ float scale_for_amax(float amax) {
    return (amax > 0.0f && amax <= 3.402823466e38f) ? fmaxf(amax / 448.0f, 1.175494351e-38f) : 1.0f;
}

__device__ __forceinline__ unsigned char encode_e4m3(float x, float scale) {
    return (unsigned char)__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, __NV_E4M3);
}

// 1x128 tiles (activations): one warp per (row, tile), 4 values per lane.
// codes: [rows, code_stride], code_stride >= cols; the codes between `cols`
// and `code_stride` are zero (E4M3 +0, nothing added to a dot product): a
// K-major operand of cuBLASLt's FP8 GEMM padded to whole 128-wide K slices.
// scales: [rows, ceil(cols / 128)], or with `outer_major`
// [ceil(cols / 128), scale_rows], the layout cuBLASLt's VEC128 scales take
// (one row of scales per K slice; scale_rows >= rows, a GEMM operand's rows
// padded to a multiple of 4). With `tensor_scale` non-null every tile takes
// that one scale (the tensorwise recipe's delayed scale, fp8_delayed_scale_f32)
// and `scales` is not written.
extern "C" __global__ void fp8_quantize_1x128_f32(unsigned char* codes, float* scales, const float* x, int rows,
                                                  int cols, int code_stride, int outer_major, int scale_rows,
                                                  const float* tensor_scale) {
    const int lane = threadIdx.x & 31;
    const int tiles_per_row = (cols + 127) / 128;
    const size_t tile = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (tile >= (size_t)rows * tiles_per_row) return;
    const size_t row = tile / tiles_per_row;
    const int col0 = (int)(tile % tiles_per_row) * 128;
    float v[4];
    float amax = 0.0f;
    for (int i = 0; i < 4; ++i) {
        const int col = col0 + lane + 32 * i;
        v[i] = col < cols ? x[row * cols + col] : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));  // fmaxf drops NaN, as the CPU's max does
    }
    const float scale = tensor_scale ? *tensor_scale : scale_for_amax(warp_max(amax));
    for (int i = 0; i < 4; ++i) {
        const int col = col0 + lane + 32 * i;
        if (col < cols)
            codes[row * code_stride + col] = encode_e4m3(v[i], scale);
        else if (col < code_stride)
            codes[row * code_stride + col] = 0;
    }
    if (lane == 0 && !tensor_scale) scales[outer_major ? (tile % tiles_per_row) * scale_rows + row : tile] = scale;
}

// The 1x128 tiles of the transpose of x: [k, m] (row-major), i.e. its 128x1
// tiles, written K-major for a GEMM whose inner dimension runs down x's
// columns (the weight gradient's K is the tokens). codes: [m, code_stride]
// (zero past k); scales as fp8_quantize_1x128_f32's for the transpose
// ([ceil(k / 128), scale_rows] with `outer_major`, else [m, ceil(k / 128)]). The same
// codes and scales as the 128x1 quantiser, transposed. One block of 256
// threads per 128 (k) x 32 (m) tile: reads coalesced along m into shared
// memory (rows padded to 33 floats against bank conflicts), then one warp
// per 4 columns takes the amax and writes that column's codes along k.
// `tensor_scale` as in fp8_quantize_1x128_f32.
extern "C" __global__ void fp8_quantize_1x128_t_f32(unsigned char* codes, float* scales, const float* x, int k, int m,
                                                    int code_stride, int outer_major, int scale_rows,
                                                    const float* tensor_scale) {
    __shared__ float tile[128][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * 32, kt = blockIdx.y, k0 = kt * 128;
    for (int r = warp; r < 128; r += 8) {
        const int kk = k0 + r, mm = m0 + lane;
        tile[r][lane] = (kk < k && mm < m) ? x[(size_t)kk * m + mm] : 0.0f;
    }
    __syncthreads();
    const int k_tiles = (k + 127) / 128;
    for (int c = warp * 4; c < warp * 4 + 4; ++c) {
        const size_t mm = (size_t)m0 + c;
        if (mm >= (size_t)m) break;  // the same for the whole warp
        float amax = 0.0f;
        for (int q = 0; q < 4; ++q) amax = fmaxf(amax, fabsf(tile[lane + 32 * q][c]));
        const float scale = tensor_scale ? *tensor_scale : scale_for_amax(warp_max(amax));
        for (int q = 0; q < 4; ++q) {
            const int kk = k0 + lane + 32 * q;
            if (kk < code_stride)
                codes[mm * code_stride + kk] = kk < k ? encode_e4m3(tile[lane + 32 * q][c], scale) : 0;
        }
        if (lane == 0 && !tensor_scale) scales[outer_major ? (size_t)kt * scale_rows + mm : mm * k_tiles + kt] = scale;
    }
}

// 128x128 blocks (weights): one block of 256 threads per tile.
// codes: [rows, code_stride] (zero between `cols` and `code_stride`, as
// fp8_quantize_1x128_f32's); scales: [ceil(rows / 128), scale_stride],
// scale_stride >= ceil(cols / 128): cuBLASLt's BLK128x128 scales want each
// row of K blocks padded to a multiple of 4.
extern "C" __global__ void fp8_quantize_128x128_f32(unsigned char* codes, float* scales, const float* w, int rows,
                                                    int cols, int code_stride, int scale_stride) {
    __shared__ float scratch[32];
    const int tile_row = blockIdx.y, tile_col = blockIdx.x;
    const int r0 = tile_row * 128, c0 = tile_col * 128;
    const int r1 = min(r0 + 128, rows), c1 = min(c0 + 128, cols);
    const int width = c1 - c0, count = (r1 - r0) * width;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x)
        amax = fmaxf(amax, fabsf(w[(size_t)(r0 + i / width) * cols + c0 + i % width]));
    const float scale = scale_for_amax(block_max(amax, scratch));
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        const int r = r0 + i / width, c = c0 + i % width;
        codes[(size_t)r * code_stride + c] = encode_e4m3(w[(size_t)r * cols + c], scale);
    }
    // The last block column also zeroes its rows' padding.
    const int pad = c1 == cols ? min(c0 + 128, code_stride) - cols : 0;
    for (int i = threadIdx.x; i < (r1 - r0) * pad; i += blockDim.x)
        codes[(size_t)(r0 + i / pad) * code_stride + cols + i % pad] = 0;
    if (threadIdx.x == 0) scales[(size_t)tile_row * scale_stride + tile_col] = scale;
}

// The 128x128 blocks of the transpose of w: [k, n] (row-major), written
// K-major, [n, code_stride] (zero past k), scales [ceil(n / 128),
// scale_stride] by (n block, k block). A block of the transpose is the
// transpose of a block (same amax, same scale, same codes), so this is
// fp8_quantize_128x128_f32 of w with the result transposed: the input
// gradient's `dy @ w` wants w's blocks along its out dimension. One block of
// 256 threads per tile: the amax reads along n, the codes are written along
// k (the reads that feed them are strided; a weight is quantised once per
// GEMM, far from the step's bottleneck).
extern "C" __global__ void fp8_quantize_128x128_t_f32(unsigned char* codes, float* scales, const float* w, int k,
                                                      int n, int code_stride, int scale_stride) {
    __shared__ float scratch[32];
    const int kb = blockIdx.x, nb = blockIdx.y;
    const int k0 = kb * 128, n0 = nb * 128;
    const int k1 = min(k0 + 128, k), n1 = min(n0 + 128, n);
    const int width = n1 - n0, count = (k1 - k0) * width;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x)
        amax = fmaxf(amax, fabsf(w[(size_t)(k0 + i / width) * n + n0 + i % width]));
    const float scale = scale_for_amax(block_max(amax, scratch));
    // Codes (and the padding past k) of each of the block's rows of the transpose.
    const int span = min(k0 + 128, code_stride) - k0;
    for (int i = threadIdx.x; i < width * span; i += blockDim.x) {
        const int c = n0 + i / span, kk = k0 + i % span;
        codes[(size_t)c * code_stride + kk] = kk < k ? encode_e4m3(w[(size_t)kk * n + c], scale) : 0;
    }
    if (threadIdx.x == 0) scales[(size_t)nb * scale_stride + kb] = scale;
}

// 128x1 tiles (activations and gradients for the weight-gradient GEMM, whose
// inner dimension runs down the columns): one thread per (128-row tile,
// column), so a warp reads 32 adjacent columns of a row at a time.
// scales: [ceil(rows / 128), cols].
extern "C" __global__ void fp8_quantize_128x1_f32(unsigned char* codes, float* scales, const float* x, int rows,
                                                  int cols) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int tile_row = blockIdx.y;
    if (col >= cols) return;
    const int r0 = tile_row * 128, r1 = min(r0 + 128, rows);
    float amax = 0.0f;
    for (int r = r0; r < r1; ++r) amax = fmaxf(amax, fabsf(x[(size_t)r * cols + col]));
    const float scale = scale_for_amax(amax);
    for (int r = r0; r < r1; ++r) codes[(size_t)r * cols + col] = encode_e4m3(x[(size_t)r * cols + col], scale);
    scales[(size_t)tile_row * cols + col] = scale;
}

__device__ __forceinline__ float decode_e4m3(unsigned char code) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
}

// out[m, n] = sum_k decode(a[m, k]) sa(m, k) decode(b[n, k]) sb(n, k): the
// FP8 GEMM `a @ b^T` with a's scales one per (row, 128-wide K slice) (1x128)
// and b's one per 128x128 block, products of one K slice summed in f32 and
// then scaled (the promotion DeepSeek-V3 describes). A plain shared-memory
// tiled kernel on CUDA cores: the numerics reference for the tensor-core path
// (cuBLASLt's block-scaled FP8 GEMM), not the fast path itself.
#define FP8_TILE 32
extern "C" __global__ void fp8_gemm_abt_f32(float* out, const unsigned char* a, const float* a_scales,
                                            const unsigned char* b, const float* b_scales, int m_rows,
                                            int n_rows, int k_dim) {
    __shared__ float a_tile[FP8_TILE][FP8_TILE + 1];
    __shared__ float b_tile[FP8_TILE][FP8_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m = blockIdx.y * FP8_TILE + ty, n = blockIdx.x * FP8_TILE + tx;
    const int k_tiles = (k_dim + 127) / 128;
    float total = 0.0f;
    for (int kb = 0; kb < k_tiles; ++kb) {
        float slice = 0.0f;
        const int k_end = min((kb + 1) * 128, k_dim);
        for (int k0 = kb * 128; k0 < k_end; k0 += FP8_TILE) {
            const int am = blockIdx.y * FP8_TILE + ty, ak = k0 + tx;
            a_tile[ty][tx] = (am < m_rows && ak < k_end) ? decode_e4m3(a[(size_t)am * k_dim + ak]) : 0.0f;
            const int bn = blockIdx.x * FP8_TILE + ty, bk = k0 + tx;
            b_tile[ty][tx] = (bn < n_rows && bk < k_end) ? decode_e4m3(b[(size_t)bn * k_dim + bk]) : 0.0f;
            __syncthreads();
            for (int i = 0; i < FP8_TILE; ++i) slice += a_tile[ty][i] * b_tile[tx][i];
            __syncthreads();
        }
        if (m < m_rows && n < n_rows)
            total += slice * a_scales[(size_t)m * k_tiles + kb] * b_scales[(size_t)(n / 128) * k_tiles + kb];
    }
    if (m < m_rows && n < n_rows) out[(size_t)m * n_rows + n] = total;
}

// out[r, c] (+)= src[r * src_ld + c] for out: [rows, width]: an FP8 GEMM's
// result, written by cuBLASLt into an aligned scratch with padded rows,
// moved into (or added onto) its destination, which may be any view.
extern "C" __global__ void fp8_unpad_rows_f32(float* out, const float* src, int rows, int width, int src_ld,
                                              int accumulate) {
    const size_t total = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const float v = src[(i / width) * src_ld + i % width];
        out[i] = accumulate ? out[i] + v : v;
    }
}

// The tensorwise recipe's delayed scaling (worker/src/fp8/delayed.rs) on the
// device: each scaled tensor (a linear layer's input, weight or output
// gradient) keeps `history` ([HISTORY_LEN] amaxes of past steps, newest
// last, `length` of them) and `observed` (the bits of the largest finite
// amax seen this step: non-negative floats order like their bits, so an
// integer max is a float max, whatever the order of the atomics).
#define FP8_HISTORY_LEN 16

// amax_bits = max(amax_bits, bits of max |x|) over n values (NaN dropped as
// fmaxf drops it, infinities kept, as the CPU's amax). amax_bits starts 0.
extern "C" __global__ void fp8_amax_f32(unsigned int* amax_bits, const float* x, size_t n) {
    __shared__ float scratch[32];
    float amax = 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        amax = fmaxf(amax, fabsf(x[i]));
    amax = block_max(amax, scratch);
    if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(amax));
}

// One thread: the scale of a tensor whose own amax is *amax_bits, from its
// history when there is one (DelayedScale::scale), and the amax observed
// for the history when it is finite and positive (DelayedScale::observe).
extern "C" __global__ void fp8_delayed_scale_f32(float* scale, unsigned int* observed, const float* history,
                                                 const int* length, const unsigned int* amax_bits) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const float current = __uint_as_float(*amax_bits);
    float amax = current;
    if (*length > 0) {
        amax = history[0];
        for (int i = 1; i < *length; ++i) amax = fmaxf(amax, history[i]);
    }
    *scale = scale_for_amax(amax);
    if (current > 0.0f && current <= 3.402823466e38f) atomicMax(observed, *amax_bits);
}

// Ends a step for `tensors` tensors (DelayedScale::advance): a tensor seen
// this step appends its observed amax to its history, dropping the oldest
// once there are FP8_HISTORY_LEN, and its observation is cleared.
extern "C" __global__ void fp8_advance_histories(float* histories, int* lengths, unsigned int* observed,
                                                 int tensors) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tensors) return;
    const unsigned int seen = observed[t];
    observed[t] = 0;
    if (seen == 0) return;
    float* history = histories + (size_t)t * FP8_HISTORY_LEN;
    int length = lengths[t];
    if (length == FP8_HISTORY_LEN) {
        for (int i = 1; i < FP8_HISTORY_LEN; ++i) history[i - 1] = history[i];
        --length;
    }
    history[length] = __uint_as_float(seen);
    lengths[t] = length + 1;
}
