// SwiGLU's gate, h = silu(a) * b, as worker/src/ops/swiglu.rs.

__device__ __forceinline__ float silu(float a) { return a / (1.0f + expf(-a)); }

extern "C" __global__ void swiglu_forward_f32(float* h, const float* a, const float* b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        h[i] = silu(a[i]) * b[i];
}

// Adds da = dh b silu'(a) and db = dh silu(a), silu'(a) = s (1 + a (1 - s)), s = sigmoid(a).
extern "C" __global__ void swiglu_backward_f32(float* da, float* db, const float* dh, const float* a,
                                               const float* b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float s = 1.0f / (1.0f + expf(-a[i]));
        da[i] += dh[i] * b[i] * (s * (1.0f + a[i] * (1.0f - s)));
        db[i] += dh[i] * a[i] * s;
    }
}
