// Token embedding, as worker/src/ops/embedding.rs: out[t] = table[tokens[t]].

extern "C" __global__ void embedding_forward_f32(float* out, const unsigned int* tokens, const float* table,
                                                 int n_tokens, int dim) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const float* src = table + (size_t)tokens[t] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(size_t)t * dim + i] = src[i];
}

// dtable[tokens[t]] += dout[t]. One thread per column walks the tokens in
// order, so repeated tokens accumulate in a fixed order (deterministic, no
// atomics) and threads of a warp touch adjacent columns (coalesced).
extern "C" __global__ void embedding_backward_f32(float* dtable, const float* dout, const unsigned int* tokens,
                                                  int n_tokens, int dim) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= dim) return;
    for (int t = 0; t < n_tokens; ++t)
        dtable[(size_t)tokens[t] * dim + col] += dout[(size_t)t * dim + col];
}
