// Emulation of the warp-level tensor-core instructions the grouped kernels use (included by emu_shim.h, after the
// thread and warp-barrier shim). Each lane deposits its fragment registers in a per-warp exchange slot; after a warp
// barrier every lane rebuilds the full operand matrices from the fragment layouts of the PTX ISA (mma.sync
// m16n8k8 .tf32 and m16n8k16 .bf16, f32 accumulate) and computes its own four outputs. A kernel that loads a
// fragment with the wrong layout therefore gets wrong products here, as it would on the GPU.
//   lane = 4 g + t (g = groupID, t = threadID_in_group)
//   m16n8k8 tf32:  a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);  b0 (t, g) b1 (t+4, g)
//   m16n8k16 bf16: a0 (g, 2t | 2t+1) a1 (g+8, 2t | 2t+1) a2 (g, 2t+8 | 2t+9) a3 (g+8, 2t+8 | 2t+9) (low half first);
//                  b0 (2t | 2t+1, g) b1 (2t+8 | 2t+9, g)
//   C / D (both):  c0 (g, 2t) c1 (g, 2t+1) c2 (g+8, 2t) c3 (g+8, 2t+1)
// Arithmetic: tf32 operands are read with their low 13 bits ignored (as the hardware does), bf16 operands exactly;
// products are exact and summed in double, then rounded once to float with the accumulator. The hardware's internal
// accumulation order and rounding differ in the last bits, so tests compare against tolerances, never bit patterns
// of a real GPU.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

struct EmuMmaSlot {
  uint32_t a[32][4];
  uint32_t b[32][2];
};
static EmuMmaSlot g_mma[32];

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 explicit mantissa bits (low 13 bits zero).
inline uint32_t agl_emu_cvt_rna_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf / NaN unchanged
  return (u + 0x1000u) & 0xffffe000u;
}

inline double emu_tf32_operand(uint32_t u) {
  u &= 0xffffe000u;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline double emu_bf16_operand(uint32_t reg, int half) {
  const uint32_t u = (half == 0 ? reg & 0xffffu : reg >> 16) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Fails loudly if a layout is not a bijection onto the matrix (a transcription error in this file).
inline void emu_check_cover(const int* hits, int count, const char* what) {
  for (int i = 0; i < count; ++i) {
    if (hits[i] != 1) {
      std::fprintf(stderr, "emu_mma: %s layout covers element %d %d times\n", what, i, hits[i]);
      std::abort();
    }
  }
}

// Shared part: deposit, barrier, (caller builds A (16 x K) and B (K x 8)), compute own outputs, barrier.
template <int kK>
inline void emu_mma_finish(float (&c)[4], const double (&A)[16][kK], const double (&B)[kK][8]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    double s = c[e];
    for (int k = 0; k < kK; ++k) s += A[row][k] * B[k][col];
    c[e] = static_cast<float>(s);
  }
}

inline void agl_emu_mma_m16n8k8_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  std::memcpy(g_mma[w].a[lane], a, sizeof(a));
  std::memcpy(g_mma[w].b[lane], b, sizeof(b));
  g_warp_barrier[w]->arrive_and_wait();
  double A[16][8], B[8][8];
  int hitA[16 * 8] = {}, hitB[8 * 8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {t, t, t + 4, t + 4};
    for (int i = 0; i < 4; ++i) A[ar[i]][ac[i]] = emu_tf32_operand(g_mma[w].a[l][i]), hitA[ar[i] * 8 + ac[i]]++;
    const int br[2] = {t, t + 4};
    for (int i = 0; i < 2; ++i) B[br[i]][g] = emu_tf32_operand(g_mma[w].b[l][i]), hitB[br[i] * 8 + g]++;
  }
  emu_check_cover(hitA, 16 * 8, "m16n8k8 A");
  emu_check_cover(hitB, 8 * 8, "m16n8k8 B");
  emu_mma_finish<8>(c, A, B);
  g_warp_barrier[w]->arrive_and_wait();  // the slot is reused by the next mma
}

inline void agl_emu_mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  std::memcpy(g_mma[w].a[lane], a, sizeof(a));
  std::memcpy(g_mma[w].b[lane], b, sizeof(b));
  g_warp_barrier[w]->arrive_and_wait();
  double A[16][16], B[16][8];
  int hitA[16 * 16] = {}, hitB[16 * 8] = {};
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      for (int h = 0; h < 2; ++h) {
        A[ar[i]][ac[i] + h] = emu_bf16_operand(g_mma[w].a[l][i], h);
        hitA[ar[i] * 16 + ac[i] + h]++;
      }
    }
    const int br[2] = {2 * t, 2 * t + 8};
    for (int i = 0; i < 2; ++i) {
      for (int h = 0; h < 2; ++h) B[br[i] + h][g] = emu_bf16_operand(g_mma[w].b[l][i], h), hitB[(br[i] + h) * 8 + g]++;
    }
  }
  emu_check_cover(hitA, 16 * 16, "m16n8k16 A");
  emu_check_cover(hitB, 16 * 8, "m16n8k16 B");
  emu_mma_finish<16>(c, A, B);
  g_warp_barrier[w]->arrive_and_wait();
}
