// Sparse carriers on CUDA (SPEC §4), shaped for decode: few tokens, so the projection is a batched
// GEMV bound by the bytes of the base weight and of each used delta, read once per token chunk.
//
// One thread block owns kRowsPerBlock output rows and a chunk of up to 16 tokens:
//   1. each warp computes base·x for its rows and every token of the chunk (16-byte vector loads
//      of base and x when aligned) and leaves the fp32 sums in a shared tile (or, for the add
//      entry point, the tile starts from y);
//   2. for every distinct carrier among the chunk's tokens and every row of the block, the row's
//      slot in that carrier (row_slots, O(1)) selects one delta row; one warp reads it once,
//      coalesced, and adds its dot with x[t, cols] for the chunk's tokens that use this carrier.
//      Each delta row belongs to exactly one block: one pass over every used delta;
//   3. the tile is rounded once and written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lcdd/lcdd.h"

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements of T in one 16-byte load.
template <typename T> __host__ __device__ constexpr int vec_n() { return static_cast<int>(16 / sizeof(T)); }

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[vec_n<T>()]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < vec_n<T>(); ++i) out[i] = to_f(e[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The minimum of 4 resident blocks (16 warps a SM to hide a GEMV's load latency) caps registers at
// 128, which every instantiation fits. Without it ptxas picked its own lower register targets and
// spilled a few cold values around the carrier loop (4-16 B in four fp32 add-path instantiations;
// other loop shapes moved the spill to the half types); with the bound stated none spills.
constexpr int kMinBlocksPerSM = 4;

template <typename T, int TT, bool kBase>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocksPerSM)
carrier_kernel(const T* __restrict__ x, int64_t xs, const T* __restrict__ base, const T* __restrict__ bias,
               T* __restrict__ y, int64_t tokens, int64_t n_out, int64_t n_in,
               const lcdd_carrier_view* __restrict__ views, int64_t n_views, const int32_t* __restrict__ ids,
               int64_t t_first, bool vec_base) {
  constexpr int V = vec_n<T>();
  __shared__ float tile[kRowsPerBlock][TT];
  __shared__ int tok_carrier[TT];
  __shared__ int distinct[TT];
  __shared__ int n_distinct;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t t0 = t_first + static_cast<int64_t>(blockIdx.y) * TT;
  const int nt = static_cast<int>(tokens - t0 < TT ? tokens - t0 : TT);

  if (threadIdx.x < TT) {
    int c = -1;
    if (static_cast<int>(threadIdx.x) < nt) c = ids ? ids[t0 + threadIdx.x] : (n_views > 0 ? 0 : -1);
    tok_carrier[threadIdx.x] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int nd = 0;
    for (int t = 0; t < TT; ++t) {
      const int c = tok_carrier[t];
      bool seen = c < 0;
      for (int d = 0; d < nd; ++d) seen |= distinct[d] == c;
      if (!seen) distinct[nd++] = c;
    }
    n_distinct = nd;
  }

  // 1. base rows (or the existing y) into the tile
  if (kBase) {
    const int64_t nw = n0 + warp * kRowsPerWarp;
    float acc[kRowsPerWarp][TT];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int t = 0; t < TT; ++t) acc[r][t] = 0.f;
    if (vec_base) {
      for (int64_t k = static_cast<int64_t>(lane) * V; k < n_in; k += 32 * V) {
        float b[kRowsPerWarp][V];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          if (nw + r < n_out) {
            load_vec(base + (nw + r) * n_in + k, b[r]);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) b[r][e] = 0.f;
          }
        }
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (t < nt) {
            float xv[V];
            load_vec(x + (t0 + t) * xs + k, xv);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
              for (int e = 0; e < V; ++e) acc[r][t] = fmaf(b[r][e], xv[e], acc[r][t]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < n_in; k += 32) {
        float b[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) b[r] = nw + r < n_out ? to_f(base[(nw + r) * n_in + k]) : 0.f;
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (t < nt) {
            const float xv = to_f(x[(t0 + t) * xs + k]);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] = fmaf(b[r], xv, acc[r][t]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float b = (bias && nw + r < n_out) ? to_f(bias[nw + r]) : 0.f;
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        const float s = warp_sum(acc[r][t]);
        if (lane == 0) tile[warp * kRowsPerWarp + r][t] = s + b;
      }
    }
  } else {
    for (int i = threadIdx.x; i < kRowsPerBlock * TT; i += blockDim.x) {
      const int r = i / TT, t = i % TT;
      const int64_t n = n0 + r;
      tile[r][t] = (n < n_out && t < nt) ? to_f(y[(t0 + t) * n_out + n]) : 0.f;
    }
  }
  __syncthreads();

  // 2. carrier rows: one warp per (distinct carrier, row of the block); branches are warp-uniform
  const int items = n_distinct * kRowsPerBlock;
  for (int it = warp; it < items; it += kWarps) {
    const int c = distinct[it / kRowsPerBlock];
    const int r = it % kRowsPerBlock;
    const int64_t n = n0 + r;
    if (n >= n_out) continue;
    const lcdd_carrier_view v = views[c];
    if (v.n_rows == 0 || v.n_cols == 0) continue;
    const int32_t slot = v.row_slots[n];
    if (slot < 0) continue;
    const T* d = static_cast<const T*>(v.delta) + static_cast<int64_t>(slot) * v.n_cols;
    float a[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) a[t] = 0.f;
    const bool vec = v.n_cols % V == 0 && reinterpret_cast<uintptr_t>(v.delta) % 16 == 0;
    if (vec) {
      for (int64_t k = static_cast<int64_t>(lane) * V; k < v.n_cols; k += 32 * V) {
        float dv[V];
        load_vec(d + k, dv);
        int32_t col[V];
#pragma unroll
        for (int e = 0; e < V; ++e) col[e] = __ldg(v.cols + k + e);
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (tok_carrier[t] == c) {
            const T* xr = x + (t0 + t) * xs;
#pragma unroll
            for (int e = 0; e < V; ++e) a[t] = fmaf(dv[e], to_f(xr[col[e]]), a[t]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < v.n_cols; k += 32) {
        const float dv = to_f(d[k]);
        const int32_t col = __ldg(v.cols + k);
#pragma unroll
        for (int t = 0; t < TT; ++t)
          if (tok_carrier[t] == c) a[t] = fmaf(dv, to_f(x[(t0 + t) * xs + col]), a[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (tok_carrier[t] == c) {
        const float s = warp_sum(a[t]);
        if (lane == 0) tile[r][t] += s;  // (r, t) belongs to this carrier only: no race
      }
    }
  }
  __syncthreads();

  // 3. one rounding, consecutive threads on consecutive rows of a token
  for (int i = threadIdx.x; i < kRowsPerBlock * TT; i += blockDim.x) {
    const int t = i / kRowsPerBlock, r = i % kRowsPerBlock;
    const int64_t n = n0 + r;
    if (t < nt && n < n_out) y[(t0 + t) * n_out + n] = from_f<T>(tile[r][t]);
  }
}

template <typename T, bool kBase>
lcdd_status launch(const void* x, int64_t xs, const void* base, const void* bias, void* y, int64_t tokens,
                   int64_t n_out, int64_t n_in, const lcdd_carrier_view* views, int64_t n_views,
                   const int32_t* ids, lcdd_stream stream) {
  constexpr int V = vec_n<T>();
  const int tt = tokens > 8 ? 16 : tokens > 4 ? 8 : tokens > 2 ? 4 : tokens > 1 ? 2 : 1;
  const bool vec_base = kBase && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(base) % 16 == 0 && xs % V == 0 && n_in % V == 0;
  const int64_t row_blocks = (n_out + kRowsPerBlock - 1) / kRowsPerBlock;
  if (row_blocks > 0x7fffffff) return LCDD_ERROR_INVALID_ARGUMENT;
  const int64_t chunks = (tokens + tt - 1) / tt;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  for (int64_t c0 = 0; c0 < chunks; c0 += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(row_blocks),
                    static_cast<unsigned>(chunks - c0 < kMaxGridY ? chunks - c0 : kMaxGridY));
    const dim3 block(kWarps * 32);
    const T* xp = static_cast<const T*>(x);
    const T* bp = static_cast<const T*>(base);
    const T* biasp = static_cast<const T*>(bias);
    T* yp = static_cast<T*>(y);
    const int64_t t_first = c0 * tt;
    switch (tt) {
#define LCDD_LAUNCH(TTV)                                                                                 \
  case TTV:                                                                                              \
    carrier_kernel<T, TTV, kBase><<<grid, block, 0, s>>>(xp, xs, bp, biasp, yp, tokens, n_out, n_in, views, \
                                                         n_views, ids, t_first, vec_base);               \
    break;
      LCDD_LAUNCH(1)
      LCDD_LAUNCH(2)
      LCDD_LAUNCH(4)
      LCDD_LAUNCH(8)
      LCDD_LAUNCH(16)
#undef LCDD_LAUNCH
    }
  }
  return cudaGetLastError() == cudaSuccess ? LCDD_OK : LCDD_ERROR_CUDA;
}

template <bool kBase>
lcdd_status run(const void* x, int64_t xs, const void* base, const void* bias, void* y, int64_t tokens,
                int64_t n_out, int64_t n_in, lcdd_dtype dtype, const lcdd_carrier_view* views, int64_t n_views,
                const int32_t* ids, lcdd_stream stream) {
  if (tokens < 0 || n_out < 0 || n_in < 0 || n_views < 0) return LCDD_ERROR_INVALID_ARGUMENT;
  if (dtype != LCDD_FLOAT32 && dtype != LCDD_FLOAT16 && dtype != LCDD_BFLOAT16) return LCDD_ERROR_UNSUPPORTED_DTYPE;
  if (tokens == 0 || n_out == 0) return LCDD_OK;
  if ((n_in > 0 && (!x || xs < n_in)) || !y || (n_views > 0 && !views)) return LCDD_ERROR_INVALID_ARGUMENT;
  if (kBase && n_in > 0 && !base) return LCDD_ERROR_INVALID_ARGUMENT;
  switch (dtype) {
    case LCDD_FLOAT32: return launch<float, kBase>(x, xs, base, bias, y, tokens, n_out, n_in, views, n_views, ids, stream);
    case LCDD_FLOAT16: return launch<__half, kBase>(x, xs, base, bias, y, tokens, n_out, n_in, views, n_views, ids, stream);
    case LCDD_BFLOAT16:
      return launch<__nv_bfloat16, kBase>(x, xs, base, bias, y, tokens, n_out, n_in, views, n_views, ids, stream);
    default: return LCDD_ERROR_UNSUPPORTED_DTYPE;
  }
}

}  // namespace

extern "C" {

lcdd_status lcdd_carrier_linear_cuda(const void* x, int64_t x_stride, const void* base, const void* bias,
                                     void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                     lcdd_dtype dtype, const lcdd_carrier_view* carriers, int64_t n_carriers,
                                     const int32_t* ids, lcdd_stream stream) {
  return run<true>(x, x_stride, base, bias, y, tokens, out_features, in_features, dtype, carriers, n_carriers,
                   ids, stream);
}

lcdd_status lcdd_carrier_add_cuda(const void* x, int64_t x_stride, void* y, int64_t tokens, int64_t out_features,
                                  int64_t in_features, lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                  int64_t n_carriers, const int32_t* ids, lcdd_stream stream) {
  return run<false>(x, x_stride, nullptr, nullptr, y, tokens, out_features, in_features, dtype, carriers,
                    n_carriers, ids, stream);
}

}  // extern "C"
