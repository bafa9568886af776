// RMSNorm, y = x / rms(x) * g, as the CPU reference worker/src/ops/rmsnorm.rs.
// One block per row: rows are the model width (1-8 K values), so a block's
// threads share one row's reduction.

extern "C" __global__ void rmsnorm_forward_f32(float* out, float* rstd, const float* x,
                                               const float* weight, int rows, int dim, float eps) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* x_row = x + (size_t)row * dim;
    float* out_row = out + (size_t)row * dim;
    float square_sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) square_sum += x_row[i] * x_row[i];
    square_sum = block_sum(square_sum, scratch);
    const float r = 1.0f / sqrtf(square_sum / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out_row[i] = x_row[i] * r * weight[i];
}

// Adds the input gradient: dx = r (g dy - x r^2 mean(g dy x)).
extern "C" __global__ void rmsnorm_backward_input_f32(float* dx, const float* dout, const float* x,
                                                      const float* weight, const float* rstd,
                                                      int rows, int dim) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * dim;
    float projection = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        projection += weight[i] * dout[base + i] * x[base + i];
    projection = block_sum(projection, scratch) / (float)dim;
    const float r = rstd[row], r2 = r * r;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        dx[base + i] += r * (weight[i] * dout[base + i] - x[base + i] * r2 * projection);
}

// The weight gradient, sum over rows of dy x r, in two deterministic
// stages (no atomics, so a training step gives the same bits every run):
// partial sums over chunks of `rows_per_chunk` rows, one thread per
// (chunk, column), then one thread per column adding its chunks in order.
// A single thread per column walking all rows used 16 of 132 SMs at 16k
// tokens and dominated the backward pass.
extern "C" __global__ void rmsnorm_backward_weight_partial_f32(float* partials, const float* dout,
                                                               const float* x, const float* rstd, int rows,
                                                               int dim, int rows_per_chunk) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (col >= dim) return;
    const int begin = chunk * rows_per_chunk, end = min(begin + rows_per_chunk, rows);
    float sum = 0.0f;
    for (int row = begin; row < end; ++row) {
        const size_t at = (size_t)row * dim + col;
        sum += dout[at] * x[at] * rstd[row];
    }
    partials[(size_t)chunk * dim + col] = sum;
}

// dweight[col] += the column's partial sums, in chunk order.
extern "C" __global__ void rmsnorm_backward_weight_f32(float* dweight, const float* partials, int chunks, int dim) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= dim) return;
    float sum = 0.0f;
    for (int chunk = 0; chunk < chunks; ++chunk) sum += partials[(size_t)chunk * dim + col];
    dweight[col] += sum;
}
