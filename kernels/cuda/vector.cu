// Whole-buffer helpers of the device training step: the residual adds and
// the gradient norm's sum of squares.

// out[i] += a[i]: a residual connection added onto a sublayer's output.
extern "C" __global__ void add_f32(float* out, const float* a, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] += a[i];
}

// partials[block] = sum of x[i]^2 over the block's grid-stride share, in
// double (the CPU's global norm sums in f64 too). The host adds the partials
// in block order, so the norm is the same bits every run.
extern "C" __global__ void sum_squares_f32(double* partials, const float* x, size_t n) {
    __shared__ double scratch[256];
    double sum = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const double v = x[i];
        sum += v * v;
    }
    scratch[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = scratch[0];
}
