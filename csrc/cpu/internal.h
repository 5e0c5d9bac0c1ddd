// Helpers shared by the C++ CPU kernels: scalar conversion for the 16-bit float types (stored as
// raw uint16_t, converted through fp32 so that every kernel accumulates in fp32) and dispatch from
// the C API's dtype enums to template instantiations.
#ifndef LCDD_CPU_INTERNAL_H_
#define LCDD_CPU_INTERNAL_H_

#include <cstdint>
#include <cstring>

#include "lcdd/lcdd.h"

namespace lcdd {

// Threads for the kernels' parallel regions (lcdd_set_num_threads, else the OpenMP default).
int threads();

// Below this many multiply-adds a kernel runs on one thread: waking a pool costs more.
constexpr int64_t kMinParallelWork = 1 << 16;

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

inline float to_float(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(half_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t man = v.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {  // inf / nan
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {  // normal
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {  // zero
    u = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 -> bf16 / fp16 with round-to-nearest-even (what PyTorch's .to() does).
inline bf16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

inline half_t to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return half_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {  // result is subnormal or zero
    if (a < 0x33000000u) return half_t{sign};  // below half the smallest subnormal
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return half_t{static_cast<uint16_t>(sign | r)};
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return half_t{static_cast<uint16_t>(sign | (r >> 13))};
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline double from_float<double>(float f) { return f; }
template <> inline bf16_t from_float<bf16_t>(float f) { return to_bf16(f); }
template <> inline half_t from_float<half_t>(float f) { return to_half(f); }

// Accumulator type: fp32 for the 16-bit types and fp32, fp64 for fp64.
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };

template <typename T> inline T from_acc(typename acc<T>::type v) { return from_float<T>(v); }
template <> inline double from_acc<double>(double v) { return v; }

// Calls f(T{}) with T the storage type of `dtype`; returns LCDD_ERROR_UNSUPPORTED_DTYPE otherwise.
template <typename F>
lcdd_status dispatch_float(lcdd_dtype dtype, F&& f) {
  switch (dtype) {
    case LCDD_FLOAT32: return f(float{});
    case LCDD_FLOAT16: return f(half_t{});
    case LCDD_BFLOAT16: return f(bf16_t{});
    case LCDD_FLOAT64: return f(double{});
  }
  return LCDD_ERROR_UNSUPPORTED_DTYPE;
}

template <typename F>
lcdd_status dispatch_index(lcdd_index_dtype dtype, F&& f) {
  switch (dtype) {
    case LCDD_INT32: return f(int32_t{});
    case LCDD_INT64: return f(int64_t{});
  }
  return LCDD_ERROR_UNSUPPORTED_DTYPE;
}

}  // namespace lcdd

#endif  // LCDD_CPU_INTERNAL_H_
