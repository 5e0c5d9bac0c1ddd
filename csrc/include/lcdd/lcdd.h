/* lcdd-kernels C API.
 *
 * Plain C: raw pointers, sizes, a dtype enum and an opaque stream, no libtorch, so that any C or
 * C++ program can link liblcdd. Every function returns an lcdd_status; lcdd_status_string()
 * turns one into text. Arrays are dense row-major unless a stride argument says otherwise.
 */
#ifndef LCDD_LCDD_H_
#define LCDD_LCDD_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LCDD_VERSION_MAJOR 0
#define LCDD_VERSION_MINOR 1
#define LCDD_VERSION_PATCH 0

typedef enum lcdd_dtype {
  LCDD_FLOAT32 = 0,
  LCDD_FLOAT16 = 1,
  LCDD_BFLOAT16 = 2,
  LCDD_FLOAT64 = 3,
} lcdd_dtype;

typedef enum lcdd_status {
  LCDD_OK = 0,
  LCDD_ERROR_INVALID_ARGUMENT = 1, /* a null pointer, a negative size, an index out of range */
  LCDD_ERROR_UNSUPPORTED_DTYPE = 2,
  LCDD_ERROR_NO_CUDA = 3,          /* a CUDA entry point in a library built without CUDA */
  LCDD_ERROR_CUDA = 4,             /* a CUDA runtime call failed */
} lcdd_status;

/* Index arrays (channels, rows, cols) may be 32- or 64-bit signed integers. */
typedef enum lcdd_index_dtype {
  LCDD_INT32 = 0,
  LCDD_INT64 = 1,
} lcdd_index_dtype;

/* An opaque stream handle: a cudaStream_t on the CUDA entry points, ignored by the CPU ones. */
typedef void* lcdd_stream;

const char* lcdd_status_string(lcdd_status status);
/* "major.minor.patch" */
const char* lcdd_version(void);
/* 1 when the library was built with its CUDA kernels, else 0. */
int lcdd_has_cuda(void);

/* ---------------------------------------------------------------------------------------------
 * Channel gather (activation capture, SPEC §5)
 *
 *   out[b, c] = hidden[b, positions[b], channels[c]]
 *
 * hidden: (batch, seq, dim) with element strides (stride_b, stride_s, stride_d), any of the four
 * float dtypes; positions: (batch,) int64 in [0, seq); channels: (n_channels,) in [0, dim), any
 * order, repeats allowed; out: (batch, n_channels) of hidden's dtype with element strides
 * (out_stride_b, out_stride_c). The CPU entry point checks every index and returns
 * LCDD_ERROR_INVALID_ARGUMENT, writing nothing, when one is out of range.
 * ------------------------------------------------------------------------------------------- */
lcdd_status lcdd_gather_channels_cpu(const void* hidden, lcdd_dtype dtype, int64_t batch, int64_t seq,
                                     int64_t dim, int64_t stride_b, int64_t stride_s, int64_t stride_d,
                                     const int64_t* positions, const void* channels,
                                     lcdd_index_dtype channel_dtype, int64_t n_channels, void* out,
                                     int64_t out_stride_b, int64_t out_stride_c);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LCDD_LCDD_H_ */
