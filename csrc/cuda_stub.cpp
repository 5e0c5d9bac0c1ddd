// Built in place of csrc/cuda/*.cu when nvcc is absent: every CUDA entry point of the C API
// exists and returns LCDD_ERROR_NO_CUDA, so programs link the same either way.
#include "lcdd/lcdd.h"

extern "C" {

lcdd_status lcdd_carrier_linear_cuda(const void*, int64_t, const void*, const void*, void*, int64_t, int64_t,
                                     int64_t, lcdd_dtype, const lcdd_carrier_view*, int64_t, const int32_t*,
                                     lcdd_stream) {
  return LCDD_ERROR_NO_CUDA;
}

lcdd_status lcdd_carrier_add_cuda(const void*, int64_t, void*, int64_t, int64_t, int64_t, lcdd_dtype,
                                  const lcdd_carrier_view*, int64_t, const int32_t*, lcdd_stream) {
  return LCDD_ERROR_NO_CUDA;
}

}  // extern "C"
