// Rotary position embedding on x: [tokens, heads, head_dim], pairs (2i, 2i+1),
// as worker/src/ops/rope.rs. cos/sin: [seq_len, head_dim / 2], computed on the
// host in f64 once per shape (the same table the CPU path uses). The tokens
// are slices of `span` consecutive positions starting at `first` (whole
// sequences: 0 and seq_len; a sequence-parallel rank's slice: its own).
// direction -1 rotates back: the backward pass of a rotation.

extern "C" __global__ void rope_f32(float* x, const float* cos_table, const float* sin_table, int tokens,
                                    int heads, int head_dim, int first, int span, float direction) {
    const int pairs = head_dim / 2;
    const size_t total = (size_t)tokens * heads * pairs;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int pair = (int)(i % pairs);
        const size_t token = i / ((size_t)pairs * heads);
        const size_t angle = (first + token % span) * pairs + pair;
        const float c = cos_table[angle], s = direction * sin_table[angle];
        float* v = x + 2 * i;
        const float a = v[0], b = v[1];
        v[0] = a * c - b * s;
        v[1] = a * s + b * c;
    }
}

// The serving engine's RoPE (worker/src/serve/engine.rs `rotate`): x is
// [rows, heads, head_dim], row r at its own `positions[r]` (a step mixes
// sequences at any positions), and the pairs either interleaved (2i, 2i + 1),
// the worker's own models, or halves (i, i + head_dim / 2), `rotate_half` in
// Hugging Face's Llama, Mixtral and Qwen. The table is the CPU engine's:
// [context, head_dim / 2]. Training's packed sequences use it too, each
// token at its place in its document, and rotate their gradient back
// (direction -1).
extern "C" __global__ void rope_positions_f32(float* x, const float* cos_table, const float* sin_table,
                                              const int* positions, int rows, int heads, int head_dim,
                                              int halves, float direction) {
    const int pairs = head_dim / 2;
    const size_t total = (size_t)rows * heads * pairs;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int pair = (int)(i % pairs);
        const size_t row_head = i / pairs;
        const size_t row = row_head / heads;
        const size_t angle = (size_t)positions[row] * pairs + pair;
        const float c = cos_table[angle], s = direction * sin_table[angle];
        float* head = x + row_head * head_dim;
        const int first = halves ? pair : 2 * pair, second = halves ? pair + pairs : 2 * pair + 1;
        const float a = head[first], b = head[second];
        head[first] = a * c - b * s;
        head[second] = a * s + b * c;
    }
}
