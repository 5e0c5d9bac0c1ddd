// Sparse carriers on the CPU (SPEC §4): the fused base-plus-carriers projection and the carrier
// part alone, for one carrier per token (OpenMP over output-row blocks or over work items).
// Accumulation is in fp32 (fp64 for float64) with one rounding per output element.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "internal.h"

#include <cstddef>

// Python builds int64 (n, 6) tables that the kernels read as lcdd_carrier_view.
static_assert(sizeof(lcdd_carrier_view) == 48 && offsetof(lcdd_carrier_view, row_slots) == 24 &&
                  offsetof(lcdd_carrier_view, n_rows) == 32 && offsetof(lcdd_carrier_view, n_cols) == 40,
              "lcdd_carrier_view layout");

namespace {

using lcdd::from_acc;
using lcdd::to_float;

template <typename T>
using Acc = typename lcdd::acc<T>::type;

template <typename T>
inline Acc<T> dot(const T* a, const T* b, int64_t n) {
  Acc<T> s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<Acc<T>>(to_float(a[i])) * static_cast<Acc<T>>(to_float(b[i]));
  return s;
}

// delta row · x[cols], with x already gathered and converted.
template <typename T>
inline Acc<T> dot_gathered(const T* d, const Acc<T>* xg, int64_t n) {
  Acc<T> s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<Acc<T>>(to_float(d[i])) * xg[i];
  return s;
}

// Which tokens use which carrier; `used` lists carriers with tokens and a non-empty delta.
struct Routing {
  std::vector<std::vector<int64_t>> tokens;
  std::vector<int64_t> used;
};

Routing route(const lcdd_carrier_view* cv, int64_t n_carriers, const int32_t* ids, int64_t tokens) {
  Routing r;
  r.tokens.resize(static_cast<size_t>(n_carriers));
  if (ids) {
    for (int64_t t = 0; t < tokens; ++t)
      if (ids[t] >= 0) r.tokens[ids[t]].push_back(t);
  } else if (n_carriers > 0) {
    for (int64_t t = 0; t < tokens; ++t) r.tokens[0].push_back(t);
  }
  for (int64_t c = 0; c < n_carriers; ++c)
    if (!r.tokens[c].empty() && cv[c].n_rows > 0 && cv[c].n_cols > 0) r.used.push_back(c);
  return r;
}

bool strictly_increasing_below(const int32_t* v, int64_t n, int64_t upper) {
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || v[i] >= upper || (i > 0 && v[i] <= v[i - 1])) return false;
  return true;
}

lcdd_status validate(const void* x, int64_t x_stride, const void* y, int64_t tokens, int64_t n_out,
                     int64_t n_in, const lcdd_carrier_view* cv, int64_t n_carriers, const int32_t* ids) {
  if (tokens < 0 || n_out < 0 || n_in < 0 || n_carriers < 0) return LCDD_ERROR_INVALID_ARGUMENT;
  if (tokens > 0 && n_in > 0 && (!x || x_stride < n_in)) return LCDD_ERROR_INVALID_ARGUMENT;
  if (tokens > 0 && n_out > 0 && !y) return LCDD_ERROR_INVALID_ARGUMENT;
  if (n_carriers > 0 && !cv) return LCDD_ERROR_INVALID_ARGUMENT;
  if (ids)
    for (int64_t t = 0; t < tokens; ++t)
      if (ids[t] < -1 || ids[t] >= n_carriers) return LCDD_ERROR_INVALID_ARGUMENT;
  for (int64_t c = 0; c < n_carriers; ++c) {
    const lcdd_carrier_view& v = cv[c];
    if (v.n_rows < 0 || v.n_cols < 0 || v.n_rows > n_out || v.n_cols > n_in) return LCDD_ERROR_INVALID_ARGUMENT;
    if (v.n_rows == 0 || v.n_cols == 0) continue;
    if (!v.delta || !v.rows || !v.cols) return LCDD_ERROR_INVALID_ARGUMENT;
    if (!strictly_increasing_below(v.rows, v.n_rows, n_out) || !strictly_increasing_below(v.cols, v.n_cols, n_in))
      return LCDD_ERROR_INVALID_ARGUMENT;
  }
  return LCDD_OK;
}

constexpr int64_t kRowBlock = 16;  // output rows per task in the fused kernel

template <typename T>
void linear(const T* x, int64_t xs, const T* base, const T* bias, T* y, int64_t tokens, int64_t n_out,
            int64_t n_in, const lcdd_carrier_view* cv, const Routing& rt) {
  const int64_t blocks = (n_out + kRowBlock - 1) / kRowBlock;
  const bool par = blocks > 1 && tokens * n_out * n_in > lcdd::kMinParallelWork;
#pragma omp parallel num_threads(lcdd::threads()) if (par)
  {
    std::vector<Acc<T>> acc(static_cast<size_t>(kRowBlock * tokens));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * kRowBlock, n1 = std::min(n_out, n0 + kRowBlock);
      for (int64_t n = n0; n < n1; ++n) {
        const Acc<T> b = bias ? static_cast<Acc<T>>(to_float(bias[n])) : Acc<T>(0);
        for (int64_t t = 0; t < tokens; ++t) acc[(n - n0) * tokens + t] = dot(x + t * xs, base + n * n_in, n_in) + b;
      }
      // Carrier rows inside [n0, n1): one binary search per block and carrier, then a walk.
      for (int64_t c : rt.used) {
        const lcdd_carrier_view& v = cv[c];
        const T* delta = static_cast<const T*>(v.delta);
        int64_t j = std::lower_bound(v.rows, v.rows + v.n_rows, static_cast<int32_t>(n0)) - v.rows;
        for (; j < v.n_rows && v.rows[j] < n1; ++j) {
          const T* d = delta + j * v.n_cols;
          for (int64_t t : rt.tokens[c]) {
            const T* xr = x + t * xs;
            Acc<T> s = 0;
            for (int64_t i = 0; i < v.n_cols; ++i)
              s += static_cast<Acc<T>>(to_float(d[i])) * static_cast<Acc<T>>(to_float(xr[v.cols[i]]));
            acc[(v.rows[j] - n0) * tokens + t] += s;
          }
        }
      }
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t n = n0; n < n1; ++n) y[t * n_out + n] = from_acc<T>(acc[(n - n0) * tokens + t]);
    }
  }
}

constexpr int64_t kAddTokens = 8;  // tokens sharing each delta row read in the add kernel
constexpr int64_t kAddRows = 64;   // carrier rows per work item

template <typename T>
void add(const T* x, int64_t xs, T* y, int64_t n_out, const lcdd_carrier_view* cv, const Routing& rt) {
  struct Item { int64_t c, tok, row; };
  std::vector<Item> items;
  int64_t max_cols = 0;
  for (int64_t c : rt.used) {
    max_cols = std::max(max_cols, cv[c].n_cols);
    const int64_t nt = static_cast<int64_t>(rt.tokens[c].size());
    for (int64_t tok = 0; tok < nt; tok += kAddTokens)
      for (int64_t row = 0; row < cv[c].n_rows; row += kAddRows) items.push_back({c, tok, row});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  int64_t work = 0;
  for (int64_t c : rt.used) work += static_cast<int64_t>(rt.tokens[c].size()) * cv[c].n_rows * cv[c].n_cols;
  const bool par = n_items > 1 && work > lcdd::kMinParallelWork;
#pragma omp parallel num_threads(lcdd::threads()) if (par)
  {
    std::vector<Acc<T>> xg(static_cast<size_t>(kAddTokens * max_cols));
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& item = items[it];
      const lcdd_carrier_view& v = cv[item.c];
      const std::vector<int64_t>& toks = rt.tokens[item.c];
      const int64_t nt = std::min<int64_t>(kAddTokens, static_cast<int64_t>(toks.size()) - item.tok);
      for (int64_t k = 0; k < nt; ++k) {  // gather x[t, cols] once for all the rows of the item
        const T* xr = x + toks[item.tok + k] * xs;
        for (int64_t i = 0; i < v.n_cols; ++i) xg[k * v.n_cols + i] = to_float(xr[v.cols[i]]);
      }
      const T* delta = static_cast<const T*>(v.delta);
      const int64_t j1 = std::min(v.n_rows, item.row + kAddRows);
      for (int64_t j = item.row; j < j1; ++j) {
        const T* d = delta + j * v.n_cols;
        for (int64_t k = 0; k < nt; ++k) {
          T* out = y + toks[item.tok + k] * n_out + v.rows[j];
          *out = from_acc<T>(static_cast<Acc<T>>(to_float(*out)) + dot_gathered(d, xg.data() + k * v.n_cols, v.n_cols));
        }
      }
    }
  }
}

}  // namespace

extern "C" {

lcdd_status lcdd_carrier_row_slots_cpu(const int32_t* rows, int64_t n_rows, int64_t out_features,
                                       int32_t* slots) {
  if (n_rows < 0 || out_features < 0 || n_rows > out_features || (out_features > 0 && !slots) ||
      (n_rows > 0 && !rows))
    return LCDD_ERROR_INVALID_ARGUMENT;
  if (!strictly_increasing_below(rows, n_rows, out_features)) return LCDD_ERROR_INVALID_ARGUMENT;
  std::fill(slots, slots + out_features, -1);
  for (int64_t j = 0; j < n_rows; ++j) slots[rows[j]] = static_cast<int32_t>(j);
  return LCDD_OK;
}

lcdd_status lcdd_carrier_linear_cpu(const void* x, int64_t x_stride, const void* base, const void* bias,
                                    void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                    lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                    int64_t n_carriers, const int32_t* ids) {
  lcdd_status s = validate(x, x_stride, y, tokens, out_features, in_features, carriers, n_carriers, ids);
  if (s != LCDD_OK) return s;
  if (out_features > 0 && in_features > 0 && !base) return LCDD_ERROR_INVALID_ARGUMENT;
  return lcdd::dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (tokens == 0 || out_features == 0) return LCDD_OK;
    const Routing rt = route(carriers, n_carriers, ids, tokens);
    linear(static_cast<const T*>(x), x_stride, static_cast<const T*>(base), static_cast<const T*>(bias),
           static_cast<T*>(y), tokens, out_features, in_features, carriers, rt);
    return LCDD_OK;
  });
}

lcdd_status lcdd_carrier_add_cpu(const void* x, int64_t x_stride, void* y, int64_t tokens,
                                 int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                                 const lcdd_carrier_view* carriers, int64_t n_carriers, const int32_t* ids) {
  lcdd_status s = validate(x, x_stride, y, tokens, out_features, in_features, carriers, n_carriers, ids);
  if (s != LCDD_OK) return s;
  return lcdd::dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (tokens == 0 || out_features == 0) return LCDD_OK;
    add(static_cast<const T*>(x), x_stride, static_cast<T*>(y), out_features, carriers,
        route(carriers, n_carriers, ids, tokens));
    return LCDD_OK;
  });
}

}  // extern "C"
