// Causal scaled dot-product attention with grouped-query heads, as
// worker/src/ops/attention.rs: q [tokens, n_heads, head_dim], k and v
// [tokens, n_kv_heads, head_dim], probs [sequences, n_heads, T, T] kept for
// the backward pass (zero above the diagonal). This is the reference-grade
// kernel (O(T^2) memory, like the CPU path); a flash-style kernel that
// recomputes the probabilities is the fast path to come.
//
// One warp per query row (sequence b, head h, position t). Scores: lane j
// takes keys j, j+32, ...; the output: lane i takes dimensions i, i+32, ...

__device__ __forceinline__ float row_dot(const float* a, const float* b, int n) {
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) sum += a[i] * b[i];
    return sum;
}

extern "C" __global__ void attention_forward_f32(float* out, float* probs, const float* q, const float* k,
                                                 const float* v, int sequences, int seq_len, int n_heads,
                                                 int n_kv_heads, int head_dim, float scale) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)sequences * n_heads * seq_len) return;
    const int t = (int)(row % seq_len);
    const int h = (int)((row / seq_len) % n_heads);
    const int b = (int)(row / ((size_t)seq_len * n_heads));
    const int kv_head = h / (n_heads / n_kv_heads);
    const size_t token = (size_t)b * seq_len + t;
    const float* q_row = q + (token * n_heads + h) * head_dim;
    float* p = probs + row * seq_len;

    float max = -INFINITY;
    for (int j = lane; j <= t; j += 32) {
        const float* k_row = k + (((size_t)b * seq_len + j) * n_kv_heads + kv_head) * head_dim;
        const float s = scale * row_dot(q_row, k_row, head_dim);
        p[j] = s;
        max = fmaxf(max, s);
    }
    max = warp_max(max);
    float sum = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        const float e = expf(p[j] - max);
        p[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    for (int j = lane; j < seq_len; j += 32) p[j] = j <= t ? p[j] / sum : 0.0f;
    __syncwarp();

    float* o = out + (token * n_heads + h) * head_dim;
    for (int i = lane; i < head_dim; i += 32) {
        float acc = 0.0f;
        for (int j = 0; j <= t; ++j)
            acc += p[j] * v[(((size_t)b * seq_len + j) * n_kv_heads + kv_head) * head_dim + i];
        o[i] = acc;
    }
}

// The query side of the backward pass, one warp per query row: the softmax
// gradient ds_j = scale p_j (dout . v_j - sum_i p_i dout . v_i), stored in
// dscores [sequences, n_heads, T, T] for the key/value kernel, and
// dq += sum_j ds_j k_j.
extern "C" __global__ void attention_backward_query_f32(float* dq, float* dscores, const float* dout,
                                                        const float* q, const float* k, const float* v,
                                                        const float* probs, int sequences, int seq_len,
                                                        int n_heads, int n_kv_heads, int head_dim, float scale) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)sequences * n_heads * seq_len) return;
    const int t = (int)(row % seq_len);
    const int h = (int)((row / seq_len) % n_heads);
    const int b = (int)(row / ((size_t)seq_len * n_heads));
    const int kv_head = h / (n_heads / n_kv_heads);
    const size_t token = (size_t)b * seq_len + t;
    const float* d_row = dout + (token * n_heads + h) * head_dim;
    const float* p = probs + row * seq_len;
    float* ds = dscores + row * seq_len;

    float projection = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        const float dp = row_dot(d_row, v + (((size_t)b * seq_len + j) * n_kv_heads + kv_head) * head_dim, head_dim);
        ds[j] = dp;
        projection += dp * p[j];
    }
    projection = warp_sum(projection);
    for (int j = lane; j < seq_len; j += 32) ds[j] = j <= t ? scale * p[j] * (ds[j] - projection) : 0.0f;
    __syncwarp();
    float* dq_row = dq + (token * n_heads + h) * head_dim;
    for (int i = lane; i < head_dim; i += 32) {
        float acc = 0.0f;
        for (int j = 0; j <= t; ++j)
            acc += ds[j] * k[(((size_t)b * seq_len + j) * n_kv_heads + kv_head) * head_dim + i];
        dq_row[i] += acc;
    }
}

// The key/value side, one warp per key row (sequence b, kv head, position
// j): dk_j += sum over the group's query heads h and positions t >= j of
// ds[h, t, j] q[t, h], and dv_j += p[h, t, j] dout[t, h]. Each output has one
// writer, so the sums are deterministic (no atomics).
extern "C" __global__ void attention_backward_key_value_f32(float* dk, float* dv, const float* dout,
                                                            const float* q, const float* probs,
                                                            const float* dscores, int sequences, int seq_len,
                                                            int n_heads, int n_kv_heads, int head_dim) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (size_t)sequences * n_kv_heads * seq_len) return;
    const int j = (int)(row % seq_len);
    const int kv_head = (int)((row / seq_len) % n_kv_heads);
    const int b = (int)(row / ((size_t)seq_len * n_kv_heads));
    const int group = n_heads / n_kv_heads;
    const size_t kv_at = (((size_t)b * seq_len + j) * n_kv_heads + kv_head) * head_dim;
    for (int i = lane; i < head_dim; i += 32) {
        float dk_acc = 0.0f, dv_acc = 0.0f;
        for (int h = kv_head * group; h < (kv_head + 1) * group; ++h) {
            for (int t = j; t < seq_len; ++t) {
                const size_t prob_at = (((size_t)b * n_heads + h) * seq_len + t) * seq_len + j;
                const size_t q_at = (((size_t)b * seq_len + t) * n_heads + h) * head_dim + i;
                dk_acc += dscores[prob_at] * q[q_at];
                dv_acc += probs[prob_at] * dout[q_at];
            }
        }
        dk[kv_at + i] += dk_acc;
        dv[kv_at + i] += dv_acc;
    }
}

// ---------------------------------------------------------------------------
// The tensor-core path (worker/src/cuda/attention.rs): the score and value
// products are batched cuBLASLt GEMMs over head-major copies of q, k and v;
// these kernels do the layout changes and the two softmax passes between
// the GEMMs. Same `probs` layout and results as the kernels above, up to the
// GEMMs' TF32 rounding.

// dst [sequences, heads, seq_len, head_dim] = src [sequences, seq_len, heads, head_dim].
extern "C" __global__ void attention_to_head_major_f32(float* dst, const float* src, int sequences, int seq_len,
                                                       int heads, int head_dim) {
    const size_t n = (size_t)sequences * seq_len * heads * head_dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int d = (int)(i % head_dim);
        const int h = (int)((i / head_dim) % heads);
        const size_t bt = i / ((size_t)head_dim * heads);
        const int t = (int)(bt % seq_len);
        const size_t b = bt / seq_len;
        dst[((b * heads + h) * seq_len + t) * head_dim + d] = src[i];
    }
}

// dst [sequences, seq_len, heads, head_dim] (+)= src [sequences, heads, seq_len, head_dim].
extern "C" __global__ void attention_to_token_major_f32(float* dst, const float* src, int sequences, int seq_len,
                                                        int heads, int head_dim, int accumulate) {
    const size_t n = (size_t)sequences * seq_len * heads * head_dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int d = (int)(i % head_dim);
        const int h = (int)((i / head_dim) % heads);
        const size_t bt = i / ((size_t)head_dim * heads);
        const int t = (int)(bt % seq_len);
        const size_t b = bt / seq_len;
        const float v = src[((b * heads + h) * seq_len + t) * head_dim + d];
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

// In place, one warp per row (sequence, head, position t) of
// probs [sequences * heads * seq_len, seq_len] (each sequence's heads
// together): raw scores q.k in, the causal softmax of scale * scores out
// over keys starts[sequence * seq_len + t] ..= t (the start of t's
// document: 0 unless sequences are packed), zero elsewhere.
extern "C" __global__ void attention_softmax_causal_f32(float* probs, const int* starts, size_t rows,
                                                        int seq_len, int n_heads, float scale) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int t = (int)(row % seq_len);
    const int first = starts[row / ((size_t)n_heads * seq_len) * seq_len + t];
    float* p = probs + row * seq_len;
    float max = -INFINITY;
    for (int j = first + lane; j <= t; j += 32) max = fmaxf(max, scale * p[j]);
    max = warp_max(max);
    float sum = 0.0f;
    for (int j = first + lane; j <= t; j += 32) {
        const float e = expf(scale * p[j] - max);
        p[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    const float inv = 1.0f / sum;
    for (int j = lane; j < seq_len; j += 32) p[j] = j >= first && j <= t ? p[j] * inv : 0.0f;
}

// In place, one warp per row: d(probs) = dout . v_j in, the score gradient
// ds_j = scale p_j (dp_j - sum_i p_i dp_i) out (zero above the diagonal,
// and wherever the forward pass masked p_j to 0: an earlier document).
extern "C" __global__ void attention_softmax_backward_f32(float* dscores, const float* probs, size_t rows,
                                                          int seq_len, float scale) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int t = (int)(row % seq_len);
    float* ds = dscores + row * seq_len;
    const float* p = probs + row * seq_len;
    float projection = 0.0f;
    for (int j = lane; j <= t; j += 32) projection += ds[j] * p[j];
    projection = warp_sum(projection);
    for (int j = lane; j < seq_len; j += 32) ds[j] = j <= t ? scale * p[j] * (ds[j] - projection) : 0.0f;
}
