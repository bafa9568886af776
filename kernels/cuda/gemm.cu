// out[m, n] = sum_k a[m, k] b[n, k] in f32 on CUDA cores, one explicit
// fused multiply-add per product (__fmaf_rn) and k summed in ascending
// order: the same operations as the CPU's matmul, so the same bits. Used
// where exactness beats speed — the router logits, whose top-k selection
// must not flip on a last-bit difference (DeepSeek-V3 keeps the gating in
// FP32 for the same reason). Tensor-core GEMMs go through cuBLASLt.
#define GEMM_TILE 32
extern "C" __global__ void gemm_abt_f32_exact(float* out, const float* a, const float* b, int m_rows, int n_rows,
                                              int k_dim) {
    __shared__ float a_tile[GEMM_TILE][GEMM_TILE + 1];
    __shared__ float b_tile[GEMM_TILE][GEMM_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m = blockIdx.y * GEMM_TILE + ty, n = blockIdx.x * GEMM_TILE + tx;
    float sum = 0.0f;
    for (int k0 = 0; k0 < k_dim; k0 += GEMM_TILE) {
        const int am = blockIdx.y * GEMM_TILE + ty, bn = blockIdx.x * GEMM_TILE + ty, k = k0 + tx;
        a_tile[ty][tx] = (am < m_rows && k < k_dim) ? a[(size_t)am * k_dim + k] : 0.0f;
        b_tile[ty][tx] = (bn < n_rows && k < k_dim) ? b[(size_t)bn * k_dim + k] : 0.0f;
        __syncthreads();
        const int steps = min(GEMM_TILE, k_dim - k0);
        for (int i = 0; i < steps; ++i) sum = __fmaf_rn(a_tile[ty][i], b_tile[tx][i], sum);
        __syncthreads();
    }
    if (m < m_rows && n < n_rows) out[(size_t)m * n_rows + n] = sum;
}
