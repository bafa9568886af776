// SwiGLU's gate, h = silu(a) * b, as worker/src/ops/swiglu.rs.

__device__ __forceinline__ float silu(float a) { return a / (1.0f + expf(-a)); }

extern "C" __global__ void swiglu_forward_f32(float* h, const float* a, const float* b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        h[i] = silu(a[i]) * b[i];
}

// Adds da = dh b silu'(a) and db = dh silu(a), silu'(a) = s (1 + a (1 - s)), s = sigmoid(a);
// with accumulate == 0 into zeros (the same sums, without a memset before).
extern "C" __global__ void swiglu_backward_f32(float* da, float* db, const float* dh, const float* a,
                                               const float* b, size_t n, int accumulate) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float s = 1.0f / (1.0f + expf(-a[i]));
        const float da0 = accumulate ? da[i] : 0.0f, db0 = accumulate ? db[i] : 0.0f;
        da[i] = da0 + dh[i] * b[i] * (s * (1.0f + a[i] * (1.0f - s)));
        db[i] = db0 + dh[i] * a[i] * s;
    }
}
