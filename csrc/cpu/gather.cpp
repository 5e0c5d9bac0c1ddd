// Channel gather on the CPU: out[b, c] = hidden[b, positions[b], channels[c]].
// A pure copy, so it is instantiated per element size, not per float type.
#include <cstdint>

#include "internal.h"

namespace {

template <typename E, typename I>
void gather(const E* hidden, int64_t batch, int64_t sb, int64_t ss, int64_t sd, const int64_t* pos,
            const I* ch, int64_t n_ch, E* out, int64_t ob, int64_t oc) {
#pragma omp parallel for schedule(static) num_threads(lcdd::threads()) if (batch * n_ch > lcdd::kMinParallelWork)
  for (int64_t b = 0; b < batch; ++b) {
    const E* row = hidden + b * sb + pos[b] * ss;
    E* dst = out + b * ob;
    for (int64_t c = 0; c < n_ch; ++c) dst[c * oc] = row[static_cast<int64_t>(ch[c]) * sd];
  }
}

template <typename I>
bool in_range(const I* v, int64_t n, int64_t upper) {
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || static_cast<int64_t>(v[i]) >= upper) return false;
  return true;
}

}  // namespace

extern "C" lcdd_status lcdd_gather_channels_cpu(const void* hidden, lcdd_dtype dtype, int64_t batch,
                                                int64_t seq, int64_t dim, int64_t stride_b,
                                                int64_t stride_s, int64_t stride_d,
                                                const int64_t* positions, const void* channels,
                                                lcdd_index_dtype channel_dtype, int64_t n_channels,
                                                void* out, int64_t out_stride_b, int64_t out_stride_c) {
  if (batch < 0 || seq < 0 || dim < 0 || n_channels < 0) return LCDD_ERROR_INVALID_ARGUMENT;
  if (batch == 0 || n_channels == 0) return LCDD_OK;
  if (!hidden || !positions || !channels || !out) return LCDD_ERROR_INVALID_ARGUMENT;
  if (!in_range(positions, batch, seq)) return LCDD_ERROR_INVALID_ARGUMENT;
  return lcdd::dispatch_index(channel_dtype, [&](auto idx) {
    using I = decltype(idx);
    const I* ch = static_cast<const I*>(channels);
    if (!in_range(ch, n_channels, dim)) return LCDD_ERROR_INVALID_ARGUMENT;
    auto run = [&](auto elem) {
      using E = decltype(elem);
      gather(static_cast<const E*>(hidden), batch, stride_b, stride_s, stride_d, positions, ch,
             n_channels, static_cast<E*>(out), out_stride_b, out_stride_c);
      return LCDD_OK;
    };
    switch (dtype) {
      case LCDD_FLOAT16:
      case LCDD_BFLOAT16: return run(uint16_t{});
      case LCDD_FLOAT32: return run(uint32_t{});
      case LCDD_FLOAT64: return run(uint64_t{});
    }
    return LCDD_ERROR_UNSUPPORTED_DTYPE;
  });
}
