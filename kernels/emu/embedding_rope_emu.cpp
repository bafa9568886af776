// Runs the training kernels that arrived after the last GPU session on the
// host (NVRTC only proves that they compile), launched as worker/src/cuda
// launches them, against plain loops:
// - embedding_backward_f32 (worker/src/cuda/embedding.rs): tokens grouped by
//   id on the host as ops::embedding::TokenGroups groups them (a stable sort),
//   one thread per (id, column); the sums in token order, so bit for bit;
// - rope_f32 over slices of `span` positions from `first` (a sequence-parallel
//   rank's slice of each sequence), forward and back;
// - rope_positions_f32 (serving: each row at its own position), pairs
//   interleaved or in halves, and back (training's packed sequences);
// - attention_softmax_causal_f32 (the GEMM path's softmax) over each
//   token's document (packed sequences) and plain causal (every start 0).
// Every CUDA thread is an OS thread (include/cuda_host.h).
//
//   g++ -std=c++20 -O2 -pthread -w -Ikernels/emu/include \
//       kernels/emu/embedding_rope_emu.cpp -o /tmp/er-emu && /tmp/er-emu
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_host.h"
#define __shared__ static
#include "../cuda/common.cuh"
#include "../cuda/embedding.cu"
#include "../cuda/rope.cu"
#include "../cuda/attention.cu"

static int failures = 0;

static void report(bool ok, const char* what, const char* detail) {
    std::printf("  %-4s %-22s %s\n", ok ? "ok" : "FAIL", what, detail);
    failures += !ok;
}

static void grid_stride(size_t n, const std::function<void()>& body) {
    launch_grid({(unsigned)std::min<size_t>((n + 255) / 256, 65535), 1, 1}, 256, [] {}, body);
}

int main() {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    char detail[96];

    // Embedding backward: a skewed batch (one id in a third of the tokens,
    // chains longer than the kernel's 8-row batches), ids never seen, a
    // table width that is not a multiple of the block's columns.
    for (const auto [tokens, vocab, dim] : {std::tuple{300, 50, 70}, {1, 4, 8}, {40, 1000, 256}}) {
        std::vector<unsigned> ids_of(tokens);
        for (auto& id : ids_of) id = rng() % 3 == 0 ? 7 % vocab : rng() % vocab;
        std::vector<float> dout((size_t)tokens * dim), table((size_t)vocab * dim);
        for (auto& v : dout) v = normal(rng);
        for (auto& v : table) v = normal(rng);
        auto want = table;
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < dim; ++c) want[(size_t)ids_of[t] * dim + c] += dout[(size_t)t * dim + c];
        // TokenGroups: positions stably sorted by id, one group per distinct id.
        std::vector<unsigned> order(tokens), starts, ids;
        std::iota(order.begin(), order.end(), 0u);
        std::stable_sort(order.begin(), order.end(), [&](unsigned a, unsigned b) { return ids_of[a] < ids_of[b]; });
        for (int i = 0; i < tokens; ++i)
            if (i == 0 || ids_of[order[i]] != ids_of[order[i - 1]]) starts.push_back(i), ids.push_back(ids_of[order[i]]);
        starts.push_back(tokens);
        const unsigned columns = 128;  // COLUMNS in embedding.rs
        launch_grid({(unsigned)ids.size(), (dim + columns - 1) / columns, 1}, columns, [] {}, [&] {
            embedding_backward_f32(table.data(), dout.data(), order.data(), starts.data(), ids.data(), dim);
        });
        std::snprintf(detail, sizeof detail, "%d tokens, vocab %d, dim %d, %zu ids", tokens, vocab, dim, ids.size());
        report(std::memcmp(table.data(), want.data(), table.size() * 4) == 0, "embedding backward", detail);
    }

    // RoPE over slices: tokens are sequences' slices of `span` positions
    // starting at `first`; forward, then back from the result.
    for (const auto [sequences, span, first, heads, dim] : {std::tuple{3, 5, 0, 2, 8}, {2, 4, 12, 3, 16}, {1, 1, 7, 1, 2}}) {
        const int pairs = dim / 2, positions = first + span;
        std::vector<float> cos_t((size_t)positions * pairs), sin_t(cos_t.size());
        for (int p = 0; p < positions; ++p)
            for (int i = 0; i < pairs; ++i) {
                const double angle = p * std::pow(10000.0, -2.0 * i / dim);
                cos_t[(size_t)p * pairs + i] = (float)std::cos(angle), sin_t[(size_t)p * pairs + i] = (float)std::sin(angle);
            }
        const int tokens = sequences * span;
        std::vector<float> x((size_t)tokens * heads * dim);
        for (auto& v : x) v = normal(rng);
        auto y = x;
        double worst = 0;
        for (const float direction : {1.0f, -1.0f}) {
            const auto before = y;
            grid_stride(x.size() / 2, [&] {
                rope_f32(y.data(), cos_t.data(), sin_t.data(), tokens, heads, dim, first, span, direction);
            });
            for (int t = 0; t < tokens; ++t)
                for (int h = 0; h < heads; ++h)
                    for (int i = 0; i < pairs; ++i) {
                        const size_t at = ((size_t)t * heads + h) * dim + 2 * i, angle = (size_t)(first + t % span) * pairs + i;
                        const double c = cos_t[angle], s = direction * sin_t[angle], a = before[at], b = before[at + 1];
                        worst = std::max({worst, std::fabs(y[at] - (a * c - b * s)), std::fabs(y[at + 1] - (a * s + b * c))});
                    }
        }
        std::snprintf(detail, sizeof detail, "slices of %d from %d, %d heads, dim %d: max err %.1e", span, first, heads, dim, worst);
        report(worst < 1e-5, "rope (slices)", detail);
    }

    // RoPE at each row's own position, interleaved pairs and halves.
    for (const int halves : {0, 1}) {
        const int rows = 9, heads = 4, dim = 12, pairs = dim / 2, context = 40;
        std::vector<float> cos_t((size_t)context * pairs), sin_t(cos_t.size());
        for (size_t i = 0; i < cos_t.size(); ++i) cos_t[i] = std::cos(0.37 * i), sin_t[i] = std::sin(0.37 * i);
        std::vector<int> positions(rows);
        for (auto& p : positions) p = rng() % context;
        std::vector<float> x((size_t)rows * heads * dim);
        for (auto& v : x) v = normal(rng);
        auto y = x;
        grid_stride(x.size() / 2, [&] {
            rope_positions_f32(y.data(), cos_t.data(), sin_t.data(), positions.data(), rows, heads, dim, halves, 1.0f);
        });
        // Direction -1 (training's backward pass, packed sequences) turns it back.
        auto back = y;
        grid_stride(x.size() / 2, [&] {
            rope_positions_f32(back.data(), cos_t.data(), sin_t.data(), positions.data(), rows, heads, dim, halves, -1.0f);
        });
        double round_trip = 0;
        for (size_t i = 0; i < x.size(); ++i) round_trip = std::max(round_trip, (double)std::fabs(back[i] - x[i]));
        double worst = 0;
        for (int r = 0; r < rows; ++r)
            for (int h = 0; h < heads; ++h)
                for (int i = 0; i < pairs; ++i) {
                    const size_t head = ((size_t)r * heads + h) * dim, angle = (size_t)positions[r] * pairs + i;
                    const size_t a_at = head + (halves ? i : 2 * i), b_at = head + (halves ? i + pairs : 2 * i + 1);
                    const double c = cos_t[angle], s = sin_t[angle], a = x[a_at], b = x[b_at];
                    worst = std::max({worst, std::fabs(y[a_at] - (a * c - b * s)), std::fabs(y[b_at] - (a * s + b * c))});
                }
        std::snprintf(detail, sizeof detail, "%s, max err %.1e, back %.1e", halves ? "halves" : "interleaved", worst,
                      round_trip);
        report(worst < 1e-5 && round_trip < 1e-5, "rope (row positions)", detail);
    }

    // The GEMM path's causal softmax, one warp per row of probs [B, H, T, T],
    // launched as worker/src/cuda/attention.rs does (8 warps a block): keys
    // from the row's document start to itself, zeros elsewhere.
    for (const bool packed : {false, true}) {
        const int sequences = 2, heads = 3, t_len = 45;
        const float scale = 0.3f;
        std::vector<int> starts((size_t)sequences * t_len, 0);
        if (packed)
            for (int b = 0; b < sequences; ++b)
                for (int t = 0, start = 0; t < t_len; ++t) {
                    if (t > start && rng() % 7 == 0) start = t;
                    starts[(size_t)b * t_len + t] = start;
                }
        const size_t rows = (size_t)sequences * heads * t_len;
        std::vector<float> scores(rows * t_len);
        for (auto& v : scores) v = 3.0f * normal(rng);
        auto probs = scores;
        launch_grid({(unsigned)((rows + 7) / 8), 1, 1}, 256, [] {}, [&] {
            attention_softmax_causal_f32(probs.data(), starts.data(), rows, t_len, heads, scale);
        });
        double worst = 0;
        for (size_t row = 0; row < rows; ++row) {
            const int t = (int)(row % t_len), b = (int)(row / ((size_t)heads * t_len));
            const int first = starts[(size_t)b * t_len + t];
            const float* s = &scores[row * t_len];
            double max = -1e300, sum = 0;
            for (int j = first; j <= t; ++j) max = std::max(max, (double)scale * s[j]);
            for (int j = first; j <= t; ++j) sum += std::exp(scale * s[j] - max);
            for (int j = 0; j < t_len; ++j) {
                const double want = j >= first && j <= t ? std::exp(scale * s[j] - max) / sum : 0.0;
                worst = std::max(worst, std::fabs(probs[row * t_len + j] - want));
            }
        }
        std::snprintf(detail, sizeof detail, "%s, max err %.1e", packed ? "packed documents" : "causal", worst);
        report(worst < 1e-6, "softmax (documents)", detail);
    }
    std::printf(failures ? "SOME FAILED\n" : "ALL OK\n");
    return failures ? 1 : 0;
}
