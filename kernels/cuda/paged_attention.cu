// The serving engine's paged KV cache on the device (worker/src/cuda/serve):
// one layer's keys and values are pools of `pages * page_size` rows of
// `kv_heads * head_dim` floats, a page's rows consecutive, as the CPU's
// KvStore (worker/src/serve/kv_cache.rs) lays out each layer. Sequences
// reach their positions through page tables: position t of a sequence is
// row pages[t / page_size] * page_size + t % page_size.

// Stores each step row's key and value into its cache row: keys[slots[r]] =
// k[r], values[slots[r]] = v[r]. A plain copy (exact); every row has its own
// slot (a page is written only by the sequence that allocated it: pages that
// prefix caching shares are whole and never written again), so no two
// threads write one element.
extern "C" __global__ void kv_write_f32(float* keys, float* values, const float* k, const float* v,
                                        const int* slots, int rows, int width) {
    const size_t total = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t row = i / width, col = i % width;
        const size_t at = (size_t)slots[row] * width + col;
        keys[at] = k[i];
        values[at] = v[i];
    }
}

// Causal grouped-query attention of step rows over the paged cache, the CPU
// engine's `attend` (worker/src/serve/engine.rs) for prefill and decode rows
// alike: query row r (at `positions[r]`, its sequence's page table at
// `page_table + table_offsets[r]`) attends to its sequence's positions
// 0..=positions[r], which the step's kv_write has already stored (its own
// position included).
//
// One block per (output row, head): blockIdx.x is the output row
// (query_rows[blockIdx.x] is its row of q), blockIdx.y the head. Each of the
// block's PA_WARPS warps takes every PA_WARPS-th position and keeps an online
// softmax (running max m, sum l, and the p-weighted sum of values, rescaled
// by exp(m_old - m_new) whenever the max grows: the max-shifted softmax
// without storing the scores, so a 32k context needs no shared memory); the
// warps' partial states are then merged against their common max. A lane
// holds head dimensions lane, lane + 32, ... (at most PA_MAX_HEAD_DIM), so a
// warp reads each cached row coalesced. Within the tolerance of the CPU's
// exact two-pass softmax (different summation order, expf), not bit-equal.
#define PA_WARPS 4
#define PA_MAX_HEAD_DIM 256
#define PA_PER_LANE (PA_MAX_HEAD_DIM / 32)
extern "C" __global__ void paged_attention_f32(float* out, const float* q, const float* keys, const float* values,
                                               const int* query_rows, const int* positions,
                                               const int* table_offsets, const int* page_table, int heads,
                                               int kv_heads, int head_dim, int page_size, float scale) {
    __shared__ float part_max[PA_WARPS], part_sum[PA_WARPS];
    __shared__ float part_acc[PA_WARPS][PA_MAX_HEAD_DIM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o = blockIdx.x, head = blockIdx.y;
    const int row = query_rows[o];
    const int position = positions[row];
    const int* pages = page_table + table_offsets[row];
    const int kv_head = head / (heads / kv_heads);
    const size_t kv_width = (size_t)kv_heads * head_dim;
    const float* q_head = q + ((size_t)row * heads + head) * head_dim;

    float qv[PA_PER_LANE], acc[PA_PER_LANE];
#pragma unroll
    for (int i = 0; i < PA_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? q_head[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int t = warp; t <= position; t += PA_WARPS) {
        const size_t slot = (size_t)pages[t / page_size] * page_size + t % page_size;
        const float* key = keys + slot * kv_width + (size_t)kv_head * head_dim;
        const float* value = values + slot * kv_width + (size_t)kv_head * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < PA_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) dot += qv[i] * key[d];
        }
        const float score = scale * warp_sum(dot);
        const float new_max = fmaxf(running_max, score);
        // exp(-inf) = 0 on the first position: nothing to rescale yet.
        const float rescale = expf(running_max - new_max);
        const float p = expf(score - new_max);
        running_sum = running_sum * rescale + p;
#pragma unroll
        for (int i = 0; i < PA_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * rescale + p * value[d];
        }
        running_max = new_max;
    }
    if (lane == 0) {
        part_max[warp] = running_max;
        part_sum[warp] = running_sum;
    }
#pragma unroll
    for (int i = 0; i < PA_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        if (d < head_dim) part_acc[warp][d] = acc[i];
    }
    __syncthreads();
    // Warp 0 always saw position 0, so the common max is finite; a warp that
    // saw no position (a row near the start) has max -inf and weight 0.
    float common_max = part_max[0];
#pragma unroll
    for (int w = 1; w < PA_WARPS; ++w) common_max = fmaxf(common_max, part_max[w]);
    float weights[PA_WARPS];
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) {
        weights[w] = expf(part_max[w] - common_max);
        total += part_sum[w] * weights[w];
    }
    float* out_head = out + ((size_t)o * heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < PA_WARPS; ++w) sum += part_acc[w][d] * weights[w];
        out_head[d] = sum / total;
    }
}
