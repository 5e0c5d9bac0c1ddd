// Test-only CUDA source for tests/test_kernel_check.py: a kernel that must spill (1024 threads and
// 2 blocks a SM cap it at 32 registers; 64 independent accumulators stay live), and a clean one.
#include <cstdint>

__global__ void __launch_bounds__(1024, 2) spilling(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = x[threadIdx.x + i];
  for (int64_t k = 0; k < n; ++k)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = fmaf(acc[i], x[k * 64 + i], acc[(i + 1) % 64]);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += acc[i] * (i + 1);
  y[threadIdx.x] = s;
}

__global__ void clean(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = 2.f * x[i];
}
