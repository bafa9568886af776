// Dropless dispatch, as worker/src/moe/dispatch.rs: the (token, k)
// assignments ("slots", flat index token * top_k + j) sorted by expert with
// a stable counting sort, then token rows copied into that expert-major
// layout (permute) and the expert outputs gathered back and weighted by the
// gates (unpermute). Every output is written by exactly one thread in a
// fixed order (no atomics on data), so results are deterministic.
//
// The sort runs in three launches over chunks of slots:
//   1. moe_chunk_counts: per chunk, how many slots go to each expert;
//   2. moe_scan_offsets: expert offsets and each chunk's base per expert;
//   3. moe_scatter_slots: one warp per chunk walks its slots in order and
//      gives each its row, ranking equal experts inside a warp step with
//      __match_any_sync.

extern "C" __global__ void moe_chunk_counts(int* chunk_counts, const int* experts, int n_slots, int n_experts,
                                            int chunk) {
    DYNAMIC_SHARED(int, counts);
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    const int begin = blockIdx.x * chunk, end = min(begin + chunk, n_slots);
    for (int slot = begin + threadIdx.x; slot < end; slot += blockDim.x) atomicAdd(&counts[experts[slot]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x)
        chunk_counts[(size_t)blockIdx.x * n_experts + e] = counts[e];
}

// One block of at least n_experts threads (n_experts <= 1024).
// offsets: [n_experts + 1]; chunk_base: [chunks, n_experts].
extern "C" __global__ void moe_scan_offsets(int* offsets, int* chunk_base, const int* chunk_counts, int chunks,
                                            int n_experts) {
    DYNAMIC_SHARED(int, scan);
    const int e = threadIdx.x;
    int total = 0;
    if (e < n_experts)
        for (int c = 0; c < chunks; ++c) total += chunk_counts[(size_t)c * n_experts + e];
    scan[e] = e < n_experts ? total : 0;
    __syncthreads();
    // Hillis-Steele inclusive scan over the experts.
    for (int step = 1; step < blockDim.x; step <<= 1) {
        const int add = e >= step ? scan[e - step] : 0;
        __syncthreads();
        scan[e] += add;
        __syncthreads();
    }
    if (e < n_experts) {
        int base = scan[e] - total;  // exclusive
        offsets[e] = base;
        if (e == n_experts - 1) offsets[n_experts] = scan[e];
        for (int c = 0; c < chunks; ++c) {
            chunk_base[(size_t)c * n_experts + e] = base;
            base += chunk_counts[(size_t)c * n_experts + e];
        }
    }
}

// One warp per chunk. row_of_slot: [n_slots]; slot_of_row: [n_slots].
extern "C" __global__ void moe_scatter_slots(int* row_of_slot, int* slot_of_row, const int* experts,
                                             const int* chunk_base, int n_slots, int n_experts, int chunk) {
    DYNAMIC_SHARED(int, next_row);
    const int lane = threadIdx.x;
    for (int e = lane; e < n_experts; e += 32) next_row[e] = chunk_base[(size_t)blockIdx.x * n_experts + e];
    __syncwarp();
    const int begin = blockIdx.x * chunk, end = min(begin + chunk, n_slots);
    for (int step = begin; step < end; step += 32) {
        const int slot = step + lane;
        const int expert = slot < end ? experts[slot] : -1;
        const unsigned int peers = __match_any_sync(FULL_MASK, expert);
        const int rank = __popc(peers & ((1u << lane) - 1u));
        const int row = expert >= 0 ? next_row[expert] + rank : 0;
        __syncwarp();
        if (expert >= 0 && lane == 31 - __clz(peers)) next_row[expert] += __popc(peers);
        __syncwarp();
        if (expert >= 0) {
            row_of_slot[slot] = row;
            slot_of_row[row] = slot;
        }
    }
}

// xp[row] = x[slot_of_row[row] / top_k]; rows are moved as 16-byte vectors,
// so one kernel serves every element type (row_vectors = row bytes / 16).
extern "C" __global__ void moe_permute_rows(uint4* xp, const uint4* x, const int* slot_of_row, int rows,
                                            int row_vectors, int top_k) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const uint4* src = x + (size_t)(slot_of_row[row] / top_k) * row_vectors;
    uint4* dst = xp + (size_t)row * row_vectors;
    for (int i = threadIdx.x; i < row_vectors; i += blockDim.x) dst[i] = src[i];
}

// dx[t] += sum_j dxp[row_of_slot[t k + j]]: the permute's backward, a gather.
extern "C" __global__ void moe_permute_backward_f32(float* dx, const float* dxp, const int* row_of_slot,
                                                    int tokens, int hidden, int top_k) {
    const int token = blockIdx.x;
    if (token >= tokens) return;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < top_k; ++j) sum += dxp[(size_t)row_of_slot[token * top_k + j] * hidden + i];
        dx[(size_t)token * hidden + i] += sum;
    }
}

// out[t] = sum_j gates[t k + j] y[row_of_slot[t k + j]], in j order.
extern "C" __global__ void moe_unpermute_f32(float* out, const float* y, const float* gates,
                                             const int* row_of_slot, int tokens, int hidden, int top_k) {
    const int token = blockIdx.x;
    if (token >= tokens) return;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float sum = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            const int slot = token * top_k + j;
            sum += gates[slot] * y[(size_t)row_of_slot[slot] * hidden + i];
        }
        out[(size_t)token * hidden + i] = sum;
    }
}

// The same in bf16 with f32 accumulation, 8 values (16 bytes) per thread step:
// the layout the GPU training path and the bandwidth benchmark use.
extern "C" __global__ void moe_unpermute_bf16(uint4* out, const uint4* y, const float* gates,
                                              const int* row_of_slot, int tokens, int row_vectors, int top_k) {
    const int token = blockIdx.x;
    if (token >= tokens) return;
    for (int i = threadIdx.x; i < row_vectors; i += blockDim.x) {
        float sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < top_k; ++j) {
            const int slot = token * top_k + j;
            const float gate = gates[slot];
            const uint4 packed = y[(size_t)row_of_slot[slot] * row_vectors + i];
            const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
            for (int p = 0; p < 4; ++p) {
                const float2 v = __bfloat1622float2(pairs[p]);
                sum[2 * p] += gate * v.x;
                sum[2 * p + 1] += gate * v.y;
            }
        }
        uint4 result;
        __nv_bfloat162* out_pairs = reinterpret_cast<__nv_bfloat162*>(&result);
        for (int p = 0; p < 4; ++p) out_pairs[p] = __floats2bfloat162_rn(sum[2 * p], sum[2 * p + 1]);
        out[(size_t)token * row_vectors + i] = result;
    }
}

// Backward of the unpermute: dy[row] += gate dout[t] for each of t's slots,
// and dgates[slot] += dot(dout[t], y[row]); with accumulate == 0 into zeros
// (every row and slot is written once: no memset before). One block per token.
extern "C" __global__ void moe_unpermute_backward_f32(float* dy, float* dgates, const float* dout,
                                                      const float* y, const float* gates, const int* row_of_slot,
                                                      int tokens, int hidden, int top_k, int accumulate) {
    __shared__ float scratch[32];
    const int token = blockIdx.x;
    if (token >= tokens) return;
    const float* d = dout + (size_t)token * hidden;
    for (int j = 0; j < top_k; ++j) {
        const int slot = token * top_k + j;
        const size_t row = (size_t)row_of_slot[slot] * hidden;
        const float gate = gates[slot];
        float dot = 0.0f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            dy[row + i] = (accumulate ? dy[row + i] : 0.0f) + gate * d[i];
            dot += d[i] * y[row + i];
        }
        dot = block_sum(dot, scratch);
        if (threadIdx.x == 0) dgates[slot] = (accumulate ? dgates[slot] : 0.0f) + dot;
    }
}
