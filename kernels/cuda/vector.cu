// Whole-buffer helpers of the device training step (the residual adds, the
// gradient norm's sum of squares, the data-parallel mean, bf16 GEMM operands) and of the serving
// engine (biases, OLMoE's clip_qkv, row gathers, Qwen2-MoE's gated shared expert).

// out[i] = x[i] rounded to the nearest bf16, ties to even (as the CPU's
// Scalar::round_bf16): the operands of a bf16 GEMM with f32 master values.
extern "C" __global__ void to_bf16_f32(__nv_bfloat16* out, const float* x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

// x[i] /= d: a data-parallel gradient sum made a mean, as the CPU divides
// (a division, not a multiplication by 1/d, so the bits are the CPU's).
extern "C" __global__ void divide_f32(float* x, size_t n, float d) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] /= d;
}

// x[i] *= s: a LoRA adapter's gradient scaled by alpha / rank, as the CPU's
// crate::train::lora::project scales it.
extern "C" __global__ void scale_f32(float* x, size_t n, float s) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

// w[i] = base[i] + s * w[i], w holding the product B·A: a LoRA merge
// W = W0 + (alpha / rank)·B·A, the CPU's operations in its order.
extern "C" __global__ void lora_merge_f32(float* w, const float* base, size_t n, float s) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        w[i] = base[i] + s * w[i];
}

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

// x[r, c] += bias[c] for x: [rows, width] (the attention projections' biases).
extern "C" __global__ void add_bias_rows_f32(float* x, const float* bias, size_t n, int width) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += bias[i % width];
}

// x[i] = clamp(x[i], -limit, limit) (OLMoE's clip_qkv), as Rust's f32::clamp.
extern "C" __global__ void clamp_f32(float* x, size_t n, float limit) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] = fminf(fmaxf(x[i], -limit), limit);
}

// out[o] = x[rows[o]] for rows of `width` (the rows whose logits a step wants).
extern "C" __global__ void gather_rows_f32(float* out, const float* x, const int* rows, int out_rows, int width) {
    const size_t total = (size_t)out_rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x)
        out[i] = x[(size_t)rows[i / width] * width + i % width];
}

// out[r, c] += sigmoid(gate[r]) * shared[r, c] (Qwen2-MoE's shared expert,
// scaled by a sigmoid of its one-output gate), as the CPU: g = 1 / (1 + exp(-g)).
extern "C" __global__ void add_sigmoid_gated_f32(float* out, const float* shared, const float* gate, size_t n,
                                                 int width) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = 1.0f / (1.0f + expf(-gate[i / width]));
        out[i] += g * shared[i];
    }
}
