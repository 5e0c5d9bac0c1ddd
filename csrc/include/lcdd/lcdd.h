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
/* Threads the CPU kernels use (OpenMP): n >= 1, or 0 for the OpenMP default. Embedders that run
 * their own thread pool (PyTorch does) set it to theirs so that the two do not oversubscribe. */
lcdd_status lcdd_set_num_threads(int n);
int lcdd_get_num_threads(void);

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

/* ---------------------------------------------------------------------------------------------
 * Sparse carriers (SPEC §4)
 *
 * A carrier of one projection (out_features N, in_features K): sorted, unique int32 `rows` in
 * [0, N) and `cols` in [0, K), and `delta` (n_rows, n_cols) row-major in the activation dtype.
 * A view with n_rows == 0 or n_cols == 0 is an empty carrier (its pointers may be NULL).
 * `row_slots` (N,) maps an output row to its index in `rows`, or -1 (lcdd_carrier_row_slots_cpu
 * builds it once per carrier); the CUDA entry points need it (an O(1) lookup per row instead of a
 * search), the CPU ones ignore it and may get NULL.
 *
 * The layout is six 8-byte fields, so a table of views is also an int64 (n, 6) array.
 * ------------------------------------------------------------------------------------------- */
typedef struct lcdd_carrier_view {
  const void* delta;
  const int32_t* rows;
  const int32_t* cols;
  const int32_t* row_slots;
  int64_t n_rows;
  int64_t n_cols;
} lcdd_carrier_view;

/* rows (n_rows,) sorted unique in [0, out_features) -> slots (out_features,) int32. */
lcdd_status lcdd_carrier_row_slots_cpu(const int32_t* rows, int64_t n_rows, int64_t out_features,
                                       int32_t* slots);

/* Base projection plus one carrier per token, in one pass over base and each used delta:
 *
 *   y[t, :] = x[t, :]·baseᵀ + bias;   then, with c = ids[t] >= 0:   y[t, rows_c] += x[t, cols_c]·delta_cᵀ
 *
 * x: (tokens, in_features), row stride x_stride elements, unit column stride; base: (out_features,
 * in_features) row-major; bias: (out_features,) or NULL; y: (tokens, out_features) row-major,
 * written. carriers: n_carriers views; ids: (tokens,) int32 in [-1, n_carriers), -1 for "no
 * carrier", or NULL for "carrier 0 on every token" (then n_carriers >= 1, or 0 for the base alone).
 * Accumulates in fp32 (fp64 for float64) and rounds once. The _cpu entry point checks sizes, ids
 * and the carriers' indices and returns LCDD_ERROR_INVALID_ARGUMENT, writing nothing, on a bad one;
 * the _cuda one checks sizes only (its arrays live on the device): indices are the caller's
 * contract there. On CUDA, x, base, bias, y, the table `carriers` itself and everything its views
 * point to, and ids are device memory; float64 is not supported; work is enqueued on `stream`.
 */
lcdd_status lcdd_carrier_linear_cpu(const void* x, int64_t x_stride, const void* base, const void* bias,
                                    void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                    lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                    int64_t n_carriers, const int32_t* ids);
lcdd_status lcdd_carrier_linear_cuda(const void* x, int64_t x_stride, const void* base, const void* bias,
                                     void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                     lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                     int64_t n_carriers, const int32_t* ids, lcdd_stream stream);

/* The carrier part alone, in place: y[t, rows_c] += x[t, cols_c]·delta_cᵀ for c = ids[t] >= 0,
 * for callers whose own GEMM already wrote y = x·baseᵀ + bias. Arguments as above. */
lcdd_status lcdd_carrier_add_cpu(const void* x, int64_t x_stride, void* y, int64_t tokens,
                                 int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                                 const lcdd_carrier_view* carriers, int64_t n_carriers, const int32_t* ids);
lcdd_status lcdd_carrier_add_cuda(const void* x, int64_t x_stride, void* y, int64_t tokens,
                                  int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                                  const lcdd_carrier_view* carriers, int64_t n_carriers, const int32_t* ids,
                                  lcdd_stream stream);

/* ---------------------------------------------------------------------------------------------
 * Prepared carriers: validate once, run many
 *
 * lcdd_carrier_check_cpu checks a table of CPU views once (sizes, pointers, and every row and column
 * sorted, unique and in range): LCDD_OK or LCDD_ERROR_INVALID_ARGUMENT. The _prepared_cpu entry
 * points then compute exactly what lcdd_carrier_linear_cpu / lcdd_carrier_add_cpu compute, on
 * views checked that way, without reading the indices to validate them on every call (that scan
 * costs about as much as a decode step's carrier work): they check sizes and pointers only
 * (O(n_carriers)), and an id outside [0, n_carriers) means "no carrier" for its token instead of
 * an error. For serving loops that call the same carriers for every token of every step.
 *
 * lcdd_carrier_linear_prepared_cpu is the one native call per projection: the base GEMV/GEMM, the
 * bias and each token's carrier rows in one pass over the base weight and each used delta, written
 * once into y (no intermediate output), OpenMP over (token chunk, output row block) tasks.
 * ------------------------------------------------------------------------------------------- */
lcdd_status lcdd_carrier_check_cpu(const lcdd_carrier_view* carriers, int64_t n_carriers, int64_t out_features,
                                   int64_t in_features);
lcdd_status lcdd_carrier_linear_prepared_cpu(const void* x, int64_t x_stride, const void* base, const void* bias,
                                             void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                             lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                             int64_t n_carriers, const int32_t* ids);
lcdd_status lcdd_carrier_add_prepared_cpu(const void* x, int64_t x_stride, void* y, int64_t tokens,
                                          int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                                          const lcdd_carrier_view* carriers, int64_t n_carriers,
                                          const int32_t* ids);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LCDD_LCDD_H_ */
