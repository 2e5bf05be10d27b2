// Plain-struct interface of the grouped (all layers, one launch per pass) CUDA kernels in agl_cuda_grouped.cu.
// No torch headers: agl_grouped_glue.cpp (torch side) and tests/cuda_emu (host emulation) both build on this.
//
// A grouped call sees L layers that share the factor dtype T and the metric dtype TM. Each layer's m x n grid is cut
// into row tiles of kGroupedBM rows; consecutive row tiles form a *band*, and one work item is one (layer, band): a
// band covers whole rows, so the item owns its rows' grad_B outright and writes one partial of grad_A. The band plan
// (grouped_band_plan) depends on the layer's shape only, never on the device or on the other layers, which is what
// makes row l of a grouped call bitwise equal to the same layer called alone, on any GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "agl_math.h"

namespace agl {

constexpr int kGroupedBM = 64;        // rows of a tile (4 warps x 16 rows)
constexpr int kGroupedBN = 64;        // columns of a tile (8 mma n8 tiles)
constexpr int kGroupedMaxBands = 8;   // at most this many bands (grad_A partials) per layer
constexpr int kGroupedRankStep = 16;  // ranks are zero-padded to a multiple of this (the bf16 mma's k)

// One layer as the kernels see it (device copy of a host-built table). Workspace offsets are in Acc elements.
template <typename T, typename TM, typename Acc>
struct GroupedLayerDesc {
  const T* B = nullptr;    // (m, r)
  const T* A = nullptr;    // (r, n)
  const T* Ba = nullptr;   // (m, ra) or nullptr
  const T* Aa = nullptr;   // (ra, n) or nullptr
  const TM* F = nullptr;   // fisher (m, n) or nullptr (weight 1)
  const TM* H = nullptr;   // task_metric (m, n) or nullptr (weight 1)
  T* dB = nullptr;         // backward outputs (same shapes as the factors); nullptr in the forward
  T* dA = nullptr;
  T* dBa = nullptr;
  T* dAa = nullptr;
  int64_t m = 0, n = 0, r = 0, ra = 0;
  Acc scale = 1;
  int64_t item0 = 0;           // first work item of this layer (items of layer l: [item0, item0 + bands))
  int64_t tiles_per_band = 1;  // row tiles per band
  int64_t bands = 0;           // work items of this layer (0 for an empty grid)
  int64_t ws_dB = 0, ws_dA = 0, ws_dBa = 0, ws_dAa = 0;  // backward workspace: dB [m][r], dA [bands][r][n], ...
  int64_t out0 = 0;            // first element of this layer's outputs in the flat output space of the backward
};

// Shape-only band plan: ceil(Tr / tiles_per_band) bands with Tr = ceil(m / kGroupedBM) row tiles, at most
// kGroupedMaxBands of them.
inline void grouped_band_plan(int64_t m, int64_t n, int64_t& tiles_per_band, int64_t& bands) {
  const int64_t tr = m > 0 && n > 0 ? (m + kGroupedBM - 1) / kGroupedBM : 0;
  const int64_t want = tr < kGroupedMaxBands ? tr : kGroupedMaxBands;
  tiles_per_band = want > 0 ? (tr + want - 1) / want : 1;
  bands = want > 0 ? (tr + tiles_per_band - 1) / tiles_per_band : 0;
}

AGL_HD int64_t grouped_rank_pad(int64_t r) { return (r + kGroupedRankStep - 1) / kGroupedRankStep * kGroupedRankStep; }

// Totals of a call, filled by grouped_plan.
struct GroupedTotals {
  int64_t items = 0;      // work items (bands) over all layers
  int64_t rank_pad = 0;   // max padded rank over the layers (sizes the shared memory)
  int64_t ws_fwd = 0;     // forward workspace, Acc elements: items * kNumSums
  int64_t ws_bwd = 0;     // backward workspace, Acc elements
  int64_t out_total = 0;  // backward outputs, elements over all layers (m r + r n + m ra + ra n)
  bool any_align = false;
};

// Fills the per-layer plan fields (item0, bands, workspace and output offsets) and returns the totals. Host code.
template <typename T, typename TM, typename Acc>
GroupedTotals grouped_plan(std::vector<GroupedLayerDesc<T, TM, Acc>>& layers) {
  GroupedTotals t;
  for (auto& l : layers) {
    grouped_band_plan(l.m, l.n, l.tiles_per_band, l.bands);
    l.item0 = t.items;
    t.items += l.bands;
    const int64_t ra = l.Ba != nullptr ? l.ra : 0;
    l.ws_dB = t.ws_bwd;
    t.ws_bwd += l.m * l.r;
    l.ws_dA = t.ws_bwd;
    t.ws_bwd += l.bands * l.r * l.n;
    l.ws_dBa = t.ws_bwd;
    t.ws_bwd += l.m * ra;
    l.ws_dAa = t.ws_bwd;
    t.ws_bwd += l.bands * ra * l.n;
    l.out0 = t.out_total;
    t.out_total += l.m * l.r + l.r * l.n + l.m * ra + ra * l.n;
    const int64_t rp = grouped_rank_pad(l.r > ra ? l.r : ra);
    t.rank_pad = rp > t.rank_pad ? rp : t.rank_pad;
    t.any_align = t.any_align || ra > 0;
  }
  t.ws_fwd = t.items * kNumSums;
  return t;
}

// Dynamic shared memory of the grouped kernels (bytes) for a given padded rank.
size_t grouped_smem_bytes(int64_t rank_pad, bool backward, size_t acc_size);

// Largest padded rank the kernels take (the glue declines larger ones: the per-layer kernels handle them).
int64_t grouped_max_rank(size_t acc_size);

// Copies the host layer table (bytes) to dev (device memory) on the stream, as kernel parameters of tiny copy kernels
// (about 4 KB each): no pinned staging buffer whose contents a CUDA graph would re-read at replay, no host sync, and
// safe under stream capture (parameters are captured by value).
void grouped_upload_table(const void* host, size_t bytes, void* dev, void* stream);

// Launchers (agl_cuda_grouped.cu). table: device copy of the layer table. Forward: terms (L, 4), sums (L, 5), Acc,
// device. Backward: grad_terms (L, 4) and sums (L, 5) Acc on the device; writes every element of the dB/dA/dBa/dAa
// outputs named in the table. ws: workspace of totals.ws_fwd / ws_bwd Acc elements (uninitialised is fine).
template <typename T, typename TM, typename Acc>
void grouped_terms_fwd_cuda(const GroupedLayerDesc<T, TM, Acc>* table, int64_t L, const GroupedTotals& t,
                      const EtaParams<Acc>& eta, Acc eps, Acc* terms, Acc* sums, Acc* ws, void* stream);
template <typename T, typename TM, typename Acc>
void grouped_terms_bwd_cuda(const GroupedLayerDesc<T, TM, Acc>* table, int64_t L, const GroupedTotals& t,
                      const EtaParams<Acc>& eta, Acc eps, const Acc* grad_terms, const Acc* sums, Acc* ws,
                      void* stream);

}  // namespace agl
