// Softmax cross-entropy over the vocabulary, as worker/src/ops/cross_entropy.rs.
// One block per row (token); rows are a vocabulary wide.

extern "C" __global__ void cross_entropy_forward_f32(float* losses, float* probs, const float* logits,
                                                     const unsigned int* targets, int rows, int vocab) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * vocab;
    float* p = probs + (size_t)row * vocab;
    float max = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) max = fmaxf(max, z[i]);
    max = block_max(max, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float e = expf(z[i] - max);
        p[i] = e;
        sum += e;
    }
    const float inv_sum = 1.0f / block_sum(sum, scratch);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) p[i] *= inv_sum;
    __syncthreads();
    if (threadIdx.x == 0) losses[row] = -logf(p[targets[row]]);
}

// Adds dlosses[r] (probs[r] - onehot(targets[r])) into dlogits, or with
// accumulate == 0 into zeros (the same sums, without a memset before).
extern "C" __global__ void cross_entropy_backward_f32(float* dlogits, const float* dlosses, const float* probs,
                                                      const unsigned int* targets, int rows, int vocab,
                                                      int accumulate) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * vocab;
    const float dloss = dlosses[row];
    const unsigned int target = targets[row];
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        dlogits[base + i] = (accumulate ? dlogits[base + i] : 0.0f) +
                            dloss * (probs[base + i] - (i == (int)target ? 1.0f : 0.0f));
}
