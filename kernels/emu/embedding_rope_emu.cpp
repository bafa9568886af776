// Runs the training kernels that arrived after the last GPU session on the
// host (NVRTC only proves that they compile), launched as worker/src/cuda
// launches them, against plain loops:
// - embedding_backward_f32 (worker/src/cuda/embedding.rs): tokens grouped by
//   id on the host as ops::embedding::TokenGroups groups them (a stable sort),
//   one thread per (id, column); the sums in token order, so bit for bit;
// - rope_f32 over slices of `span` positions from `first` (a sequence-parallel
//   rank's slice of each sequence), forward and back;
// - rope_positions_f32 (serving: each row at its own position), pairs
//   interleaved or in halves.
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
            rope_positions_f32(y.data(), cos_t.data(), sin_t.data(), positions.data(), rows, heads, dim, halves);
        });
        double worst = 0;
        for (int r = 0; r < rows; ++r)
            for (int h = 0; h < heads; ++h)
                for (int i = 0; i < pairs; ++i) {
                    const size_t head = ((size_t)r * heads + h) * dim, angle = (size_t)positions[r] * pairs + i;
                    const size_t a_at = head + (halves ? i : 2 * i), b_at = head + (halves ? i + pairs : 2 * i + 1);
                    const double c = cos_t[angle], s = sin_t[angle], a = x[a_at], b = x[b_at];
                    worst = std::max({worst, std::fabs(y[a_at] - (a * c - b * s)), std::fabs(y[b_at] - (a * s + b * c))});
                }
        std::snprintf(detail, sizeof detail, "%s, max err %.1e", halves ? "halves" : "interleaved", worst);
        report(worst < 1e-5, "rope (row positions)", detail);
    }
    std::printf(failures ? "SOME FAILED\n" : "ALL OK\n");
    return failures ? 1 : 0;
}
