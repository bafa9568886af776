// Token embedding, as worker/src/ops/embedding.rs: out[t] = table[tokens[t]].

extern "C" __global__ void embedding_forward_f32(float* out, const unsigned int* tokens, const float* table,
                                                 int n_tokens, int dim) {
    const int t = blockIdx.x;
    if (t >= n_tokens) return;
    const float* src = table + (size_t)tokens[t] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(size_t)t * dim + i] = src[i];
}

// dtable[tokens[t]] += dout[t], with the tokens grouped by id on the host
// (worker/src/ops/embedding.rs, TokenGroups): group g is id ids[g], at token
// positions order[starts[g] .. starts[g + 1]] in token order. One thread per
// (group, column) adds its id's rows into a register in that order and
// writes the row once: each element gets the CPU's additions in the CPU's
// order (identical bits, deterministic, no atomics), and a warp reads
// adjacent columns (coalesced). One thread per column walking all tokens
// used 16 of 132 SMs at hidden 2048 for 16k dependent read-modify-writes
// each; here every distinct id has its own threads and the longest chain is
// the most frequent id's count (all n_tokens only if every token is one id).
// Groups on x (up to n_tokens of them), column blocks on y.
extern "C" __global__ void embedding_backward_f32(float* dtable, const float* dout, const unsigned int* order,
                                                  const unsigned int* starts, const unsigned int* ids,
                                                  int dim) {
    const int group = blockIdx.x;
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= dim) return;
    const unsigned int begin = starts[group], end = starts[group + 1];
    float* d = dtable + (size_t)ids[group] * dim + col;
    float sum = *d;
    unsigned int k = begin;
    // Eight loads in flight before their (in-order) additions: a frequent
    // id's chain waits on memory once per eight rows, not per row.
    for (; k + 8 <= end; k += 8) {
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = dout[(size_t)order[k + j] * dim + col];
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += v[j];
    }
    for (; k < end; ++k) sum += dout[(size_t)order[k] * dim + col];
    *d = sum;
}
