// A minimal CUDA shim for running .cu kernels as host C++ (one std::thread per CUDA thread, real barriers),
// shared by the emulators in this folder. Include it before the .cu file; it defines AGL_CUDA_EMULATION.
#pragma once
#define AGL_CUDA_EMULATION 1

#include <cstdint>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <vector>

// ---------------------------------------------------------------- a minimal CUDA shim -----------------------------
struct EmuUint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
static thread_local EmuUint3 threadIdx, blockIdx;
static dim3 gridDim, blockDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

static std::vector<unsigned char> g_smem;
static std::barrier<>* g_block_barrier = nullptr;
static std::barrier<>* g_warp_barrier[32];
static double g_shfl[32][32];

inline unsigned char* agl_emu_smem() { return g_smem.data(); }
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

template <typename V>
V __shfl_down_sync(unsigned, V v, int off) {
  static_assert(sizeof(V) <= sizeof(double), "shuffle slot");
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  std::memcpy(&g_shfl[w][lane], &v, sizeof(V));
  g_warp_barrier[w]->arrive_and_wait();
  V r = v;
  if (lane + off < 32) std::memcpy(&r, &g_shfl[w][lane + off], sizeof(V));
  g_warp_barrier[w]->arrive_and_wait();
  return r;
}

#include "emu_mma.h"

// Runs body() for every thread of every block of grid (blocks one after another), with `smem` bytes of NaN-filled
// dynamic shared memory per block.
inline void launch(dim3 grid, unsigned threads, size_t smem, const std::function<void()>& body) {
  gridDim = grid;
  blockDim = dim3{threads, 1, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_smem.assign(smem + 16, 0xFF);  // all-ones bytes: NaN as float or double
      std::barrier<> bar(threads);
      g_block_barrier = &bar;
      std::vector<std::barrier<>*> warps;
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) g_warp_barrier[w] = new std::barrier<>(32);
      std::vector<std::thread> ts;
      for (unsigned t = 0; t < threads; ++t) {
        ts.emplace_back([=, &body] {
          threadIdx = EmuUint3{t, 0, 0};
          blockIdx = EmuUint3{bx, by, 0};
          body();
        });
      }
      for (auto& t : ts) t.join();
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) delete g_warp_barrier[w];
    }
  }
}

template <typename U>
void fill_nan(std::vector<U>& v) {
  std::memset(static_cast<void*>(v.data()), 0xFF, v.size() * sizeof(U));
}

