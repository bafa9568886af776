// Routing, as worker/src/moe/routing.rs: affinity scores (softmax or
// sigmoid), the selection bias added for choosing only, group-limited top-k,
// and the gates from the unbiased scores (normalised, times the routed
// scaling factor). One warp per token; the biased scores live in shared
// memory, n_experts floats per warp (dynamic shared memory).
//
// Ties go to the lower index everywhere, like the CPU reference, so both
// pick the same experts for the same scores.

// The better of two (value, index) candidates: larger value, then lower index.
__device__ __forceinline__ bool beats(float v, int i, float best_v, int best_i) {
    return v > best_v || (v == best_v && i < best_i);
}

// Warp-wide best candidate, broadcast to every lane.
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_v = __shfl_xor_sync(FULL_MASK, v, offset);
        const int other_i = __shfl_xor_sync(FULL_MASK, i, offset);
        if (beats(other_v, other_i, v, i)) { v = other_v; i = other_i; }
    }
}

extern "C" __global__ void router_topk_f32(float* scores, int* experts, float* gates, const float* logits,
                                           const float* bias, int tokens, int n_experts, int top_k,
                                           int sigmoid_scores, int n_groups, int top_groups, int normalize,
                                           float scaling) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int token = blockIdx.x * (blockDim.x >> 5) + warp;
    if (token >= tokens) return;  // the whole warp leaves together
    float* biased = shared + warp * n_experts;
    const float* z = logits + (size_t)token * n_experts;
    float* s = scores + (size_t)token * n_experts;

    if (sigmoid_scores) {
        for (int e = lane; e < n_experts; e += 32) {
            const float p = 1.0f / (1.0f + expf(-z[e]));
            s[e] = p;
            biased[e] = p + bias[e];
        }
    } else {
        float max = -INFINITY;
        for (int e = lane; e < n_experts; e += 32) max = fmaxf(max, z[e]);
        max = warp_max(max);
        float sum = 0.0f;
        for (int e = lane; e < n_experts; e += 32) {
            const float p = expf(z[e] - max);
            s[e] = p;
            sum += p;
        }
        const float inv_sum = 1.0f / warp_sum(sum);
        for (int e = lane; e < n_experts; e += 32) {
            const float p = s[e] * inv_sum;
            s[e] = p;
            biased[e] = p + bias[e];
        }
    }
    __syncwarp();

    if (n_groups > 1) {
        // A group's score is the sum of its two best biased scores; lane g
        // scores group g, then the warp picks the top_groups best groups and
        // rules out every expert of the others.
        const int size = n_experts / n_groups;
        float group_score = -INFINITY;
        if (lane < n_groups) {
            float first = -INFINITY, second = -INFINITY;
            for (int e = lane * size; e < (lane + 1) * size; ++e) {
                const float v = biased[e];
                if (v > first) { second = first; first = v; }
                else if (v > second) { second = v; }
            }
            group_score = first + second;
        }
        unsigned int chosen = 0;
        for (int round = 0; round < top_groups; ++round) {
            float v = (lane < n_groups && !(chosen >> lane & 1u)) ? group_score : -INFINITY;
            int g = lane < n_groups ? lane : 0x7fffffff;
            if (chosen >> lane & 1u) g = 0x7fffffff;
            warp_best(v, g);
            chosen |= 1u << g;
        }
        for (int e = lane; e < n_experts; e += 32)
            if (!(chosen >> (e / size) & 1u)) biased[e] = -INFINITY;
        __syncwarp();
    }

    int* token_experts = experts + (size_t)token * top_k;
    float* token_gates = gates + (size_t)token * top_k;
    float gate_sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
        float v = -INFINITY;
        int index = 0x7fffffff;
        for (int e = lane; e < n_experts; e += 32)
            if (beats(biased[e], e, v, index)) { v = biased[e]; index = e; }
        warp_best(v, index);
        __syncwarp();
        if (lane == (index & 31)) biased[index] = -INFINITY;  // taken
        const float gate = s[index];  // the gate uses the unbiased score
        gate_sum += gate;  // in selection order, as the CPU sums
        if (lane == 0) { token_experts[j] = index; token_gates[j] = gate; }
        __syncwarp();
    }
    if (lane == 0) {
        const float scale = normalize ? scaling / (gate_sum + 1e-20f) : scaling;
        for (int j = 0; j < top_k; ++j) token_gates[j] *= scale;
    }
}

// The routing backward, fused, one warp per token: d loss / d gates ->
// d scores of the selected experts (normalisation and scaling undone, as
// worker/src/moe/routing.rs gates_backward) -> d logits through the score
// function (scores_backward). Overwrites dlogits [tokens, n_experts].
extern "C" __global__ void router_backward_f32(float* dlogits, const float* dgates, const float* scores,
                                               const int* experts, int tokens, int n_experts, int top_k,
                                               int sigmoid_scores, int normalize, float scaling) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int token = blockIdx.x * (blockDim.x >> 5) + warp;
    if (token >= tokens) return;
    const float* s = scores + (size_t)token * n_experts;
    const int* chosen = experts + (size_t)token * top_k;
    const float* dg = dgates + (size_t)token * top_k;
    float* dz = dlogits + (size_t)token * n_experts;

    // Every lane computes the (few) selected experts' score gradients itself.
    float denominator = 1e-20f, weighted = 0.0f;
    if (normalize) {
        for (int j = 0; j < top_k; ++j) denominator += s[chosen[j]];
        for (int j = 0; j < top_k; ++j) weighted += dg[j] * s[chosen[j]];
    }
    // d score of expert e (0 unless selected).
    auto dscore = [&](int e) {
        float d = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            if (chosen[j] != e) continue;
            d += normalize ? scaling * (dg[j] / denominator - weighted / (denominator * denominator))
                           : scaling * dg[j];
        }
        return d;
    };
    if (sigmoid_scores) {
        for (int e = lane; e < n_experts; e += 32) dz[e] = dscore(e) * s[e] * (1.0f - s[e]);
    } else {
        // Softmax: dz_e = p_e (ds_e - sum_i ds_i p_i); ds is non-zero only on the selected experts.
        float projection = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            const int e = chosen[j];
            bool first = true;  // count an expert once even if listed twice
            for (int i = 0; i < j; ++i) first &= chosen[i] != e;
            if (first) projection += dscore(e) * s[e];
        }
        for (int e = lane; e < n_experts; e += 32) dz[e] = s[e] * (dscore(e) - projection);
    }
}
