// AdamW on FP32 master weights, as worker/src/train/optimizer.rs. Every
// operation is an explicitly rounded intrinsic, in the CPU's order, so the
// compiler cannot contract them into FMAs: the GPU update is bit-identical
// to the CPU one, and a run can move between them without drifting.

extern "C" __global__ void adamw_f32(float* weights, float* first_moment, float* second_moment,
                                     const float* grads, size_t n, float lr, float beta1, float beta2,
                                     float eps, float decay_factor, float correction1, float correction2,
                                     float grad_scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = __fmul_rn(grads[i], grad_scale);
        const float m = __fadd_rn(__fmul_rn(beta1, first_moment[i]), __fmul_rn(__fsub_rn(1.0f, beta1), g));
        const float v = __fadd_rn(__fmul_rn(beta2, second_moment[i]),
                                  __fmul_rn(__fmul_rn(__fsub_rn(1.0f, beta2), g), g));
        first_moment[i] = m;
        second_moment[i] = v;
        const float step = __fdiv_rn(__fdiv_rn(m, correction1), __fadd_rn(__fsqrt_rn(__fdiv_rn(v, correction2)), eps));
        weights[i] = __fsub_rn(__fmul_rn(weights[i], decay_factor), __fmul_rn(lr, step));
    }
}
