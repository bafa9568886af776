// Rotary position embedding on x: [tokens, heads, head_dim], pairs (2i, 2i+1),
// as worker/src/ops/rope.rs. cos/sin: [seq_len, head_dim / 2], computed on the
// host in f64 once per shape (the same table the CPU path uses). direction
// -1 rotates back: the backward pass of a rotation.

extern "C" __global__ void rope_f32(float* x, const float* cos_table, const float* sin_table, int tokens,
                                    int heads, int head_dim, int seq_len, float direction) {
    const int pairs = head_dim / 2;
    const size_t total = (size_t)tokens * heads * pairs;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int pair = (int)(i % pairs);
        const size_t token = i / ((size_t)pairs * heads);
        const size_t angle = (token % seq_len) * pairs + pair;
        const float c = cos_table[angle], s = direction * sin_table[angle];
        float* v = x + 2 * i;
        const float a = v[0], b = v[1];
        v[0] = a * c - b * s;
        v[1] = a * s + b * c;
    }
}
