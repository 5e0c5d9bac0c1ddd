// C++ unit test of the CPU carrier kernels against a naive double-precision loop: every dtype,
// fused and add entry points, mixed per-token carriers (including none and NULL ids), empty and
// full carriers, strided x, and the refusal of bad indices and ids.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../cpu/internal.h"
#include "expect.h"
#include "lcdd/lcdd.h"

namespace {

uint64_t rng = 88172645463325252ull;
double uniform() {  // xorshift64 in [-1, 1)
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return static_cast<double>(rng >> 11) / 4503599627370496.0 - 1.0;
}

template <typename T> T store(double v) { return lcdd::from_float<T>(static_cast<float>(v)); }
template <> double store<double>(double v) { return v; }

struct Carrier {
  std::vector<int32_t> rows, cols;
  std::vector<double> delta;  // exact values as stored in T (rounded on creation)
};

// Every `step`-th index from `offset`, so that carriers hit tile edges and the last row/column.
std::vector<int32_t> pick(int64_t n, int64_t step, int64_t offset) {
  std::vector<int32_t> v;
  for (int64_t i = offset; i < n; i += step) v.push_back(static_cast<int32_t>(i));
  return v;
}

template <typename T>
// ids patterns: 0 cycles through -1, 0..3; 1 puts the tokens in 4 contiguous blocks (a chunk of 16
// tokens holds several carriers, each with more or fewer tokens than the few-token path takes);
// 2 gives every token carrier 0.
void run_case(lcdd_dtype dt, int64_t tokens, int64_t n_out, int64_t n_in, bool with_ids, double tol,
              int pattern = 0) {
  const int64_t xs = n_in + 3;  // padded rows: a strided x
  std::vector<T> x(tokens * xs), base(n_out * n_in), bias(n_out);
  std::vector<double> xd(tokens * xs), based(n_out * n_in), biasd(n_out);
  auto fill = [](std::vector<T>& t, std::vector<double>& d) {
    for (size_t i = 0; i < t.size(); ++i) {
      t[i] = store<T>(uniform());
      d[i] = static_cast<double>(lcdd::to_float(t[i]));
    }
  };
  fill(x, xd);
  fill(base, based);
  fill(bias, biasd);

  // carriers: sparse, full, empty rows, empty cols
  std::vector<Carrier> cs(4);
  cs[0].rows = pick(n_out, 3, 1);
  cs[0].cols = pick(n_in, 4, 0);
  cs[1].rows = pick(n_out, 1, 0);
  cs[1].cols = pick(n_in, 1, 0);
  cs[2].cols = pick(n_in, 2, 1);
  cs[3].rows = pick(n_out, 2, 0);
  std::vector<std::vector<T>> deltas(cs.size());
  std::vector<std::vector<int32_t>> slots(cs.size());
  std::vector<lcdd_carrier_view> views(cs.size());
  for (size_t c = 0; c < cs.size(); ++c) {
    const size_t nd = cs[c].rows.size() * cs[c].cols.size();
    deltas[c].resize(nd);
    cs[c].delta.resize(nd);
    for (size_t i = 0; i < nd; ++i) {
      deltas[c][i] = store<T>(uniform());
      cs[c].delta[i] = static_cast<double>(lcdd::to_float(deltas[c][i]));
    }
    slots[c].resize(n_out);
    EXPECT(lcdd_carrier_row_slots_cpu(cs[c].rows.data(), static_cast<int64_t>(cs[c].rows.size()), n_out,
                                      slots[c].data()) == LCDD_OK);
    views[c] = {deltas[c].data(), cs[c].rows.data(), cs[c].cols.data(), slots[c].data(),
                static_cast<int64_t>(cs[c].rows.size()), static_cast<int64_t>(cs[c].cols.size())};
  }
  std::vector<int32_t> ids(tokens);
  for (int64_t t = 0; t < tokens; ++t) ids[t] = static_cast<int32_t>(t % 6) - 1;  // -1, 0..3, 4 -> see below
  for (int64_t t = 0; t < tokens; ++t)
    if (ids[t] > 3) ids[t] = 0;
  for (int64_t t = 0; t < tokens && pattern > 0; ++t)
    ids[t] = pattern == 1 ? static_cast<int32_t>(t * 4 / tokens) : 0;

  // naive reference
  std::vector<double> ref(tokens * n_out);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t n = 0; n < n_out; ++n) {
      double s = biasd[n];
      for (int64_t k = 0; k < n_in; ++k) s += xd[t * xs + k] * based[n * n_in + k];
      ref[t * n_out + n] = s;
    }
    const int c = with_ids ? ids[t] : 0;
    if (c < 0) continue;
    const Carrier& cr = cs[c];
    for (size_t j = 0; j < cr.rows.size(); ++j) {
      double s = 0;
      for (size_t i = 0; i < cr.cols.size(); ++i) s += cr.delta[j * cr.cols.size() + i] * xd[t * xs + cr.cols[i]];
      ref[t * n_out + cr.rows[j]] += s;
    }
  }
  const int32_t* idp = with_ids ? ids.data() : nullptr;
  std::vector<T> y(tokens * n_out, store<T>(7.0));
  EXPECT(lcdd_carrier_linear_cpu(x.data(), xs, base.data(), bias.data(), y.data(), tokens, n_out, n_in, dt,
                                 views.data(), static_cast<int64_t>(views.size()), idp) == LCDD_OK);
  double worst = 0;
  for (int64_t i = 0; i < tokens * n_out; ++i)
    worst = std::fmax(worst, std::fabs(static_cast<double>(lcdd::to_float(y[i])) - ref[i]));
  if (!(worst <= tol)) std::printf("linear dtype %d T=%lld: max err %g > %g\n", dt, (long long)tokens, worst, tol);
  EXPECT(worst <= tol);

  // add: start from the exact base part (computed by the fused kernel without carriers), then add
  std::vector<T> y2(tokens * n_out);
  EXPECT(lcdd_carrier_linear_cpu(x.data(), xs, base.data(), bias.data(), y2.data(), tokens, n_out, n_in, dt,
                                 nullptr, 0, nullptr) == LCDD_OK);
  EXPECT(lcdd_carrier_add_cpu(x.data(), xs, y2.data(), tokens, n_out, n_in, dt, views.data(),
                              static_cast<int64_t>(views.size()), idp) == LCDD_OK);
  worst = 0;
  for (int64_t i = 0; i < tokens * n_out; ++i)
    worst = std::fmax(worst, std::fabs(static_cast<double>(lcdd::to_float(y2[i])) - ref[i]));
  if (!(worst <= 2 * tol)) std::printf("add dtype %d T=%lld: max err %g > %g\n", dt, (long long)tokens, worst, 2 * tol);
  EXPECT(worst <= 2 * tol);

  // prepared: views checked once, then the same results bit for bit (same kernels, same order)
  EXPECT(lcdd_carrier_check_cpu(views.data(), static_cast<int64_t>(views.size()), n_out, n_in) == LCDD_OK);
  std::vector<T> y3(tokens * n_out, store<T>(7.0)), y4(tokens * n_out);
  EXPECT(lcdd_carrier_linear_prepared_cpu(x.data(), xs, base.data(), bias.data(), y3.data(), tokens, n_out, n_in,
                                          dt, views.data(), static_cast<int64_t>(views.size()), idp) == LCDD_OK);
  EXPECT(std::memcmp(y3.data(), y.data(), y.size() * sizeof(T)) == 0);
  EXPECT(lcdd_carrier_linear_prepared_cpu(x.data(), xs, base.data(), bias.data(), y4.data(), tokens, n_out, n_in,
                                          dt, nullptr, 0, nullptr) == LCDD_OK);
  EXPECT(lcdd_carrier_add_prepared_cpu(x.data(), xs, y4.data(), tokens, n_out, n_in, dt, views.data(),
                                       static_cast<int64_t>(views.size()), idp) == LCDD_OK);
  EXPECT(std::memcmp(y4.data(), y2.data(), y2.size() * sizeof(T)) == 0);
}

// The prepared entry points on ids the checked ones refuse: an id outside [0, n_carriers) gives
// its token the base projection alone (the checked path's -1).
void prepared_ids() {
  const int64_t n_out = 6, n_in = 5, tokens = 4;
  std::vector<float> x(tokens * n_in), base(n_out * n_in), d(2 * 2, 1.0f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(uniform());
  for (size_t i = 0; i < base.size(); ++i) base[i] = static_cast<float>(uniform());
  int32_t rows[2] = {1, 4}, cols[2] = {0, 3};
  lcdd_carrier_view v = {d.data(), rows, cols, nullptr, 2, 2};
  int32_t odd[tokens] = {-7, 1, 5, -1}, none[tokens] = {-1, -1, -1, -1};
  std::vector<float> y(tokens * n_out), want(tokens * n_out);
  EXPECT(lcdd_carrier_linear_prepared_cpu(x.data(), n_in, base.data(), nullptr, y.data(), tokens, n_out, n_in,
                                          LCDD_FLOAT32, &v, 1, odd) == LCDD_OK);
  EXPECT(lcdd_carrier_linear_cpu(x.data(), n_in, base.data(), nullptr, want.data(), tokens, n_out, n_in,
                                 LCDD_FLOAT32, &v, 1, none) == LCDD_OK);
  EXPECT(std::memcmp(y.data(), want.data(), y.size() * sizeof(float)) == 0);
  EXPECT(lcdd_carrier_linear_cpu(x.data(), n_in, base.data(), nullptr, want.data(), tokens, n_out, n_in,
                                 LCDD_FLOAT32, &v, 1, odd) == LCDD_ERROR_INVALID_ARGUMENT);
  // what the check refuses: unsorted, repeated, out of range, more rows than the projection
  int32_t unsorted[2] = {4, 1}, repeated[2] = {3, 3}, oob[2] = {0, 5};
  lcdd_carrier_view bad = v;
  EXPECT(lcdd_carrier_check_cpu(&v, 1, n_out, n_in) == LCDD_OK);
  bad.rows = unsorted;
  EXPECT(lcdd_carrier_check_cpu(&bad, 1, n_out, n_in) == LCDD_ERROR_INVALID_ARGUMENT);
  bad = v;
  bad.cols = repeated;
  EXPECT(lcdd_carrier_check_cpu(&bad, 1, n_out, n_in) == LCDD_ERROR_INVALID_ARGUMENT);
  bad = v;
  bad.cols = oob;
  EXPECT(lcdd_carrier_check_cpu(&bad, 1, n_out, n_in) == LCDD_ERROR_INVALID_ARGUMENT);
  bad = v;
  bad.n_rows = n_out + 1;
  EXPECT(lcdd_carrier_check_cpu(&bad, 1, n_out, n_in) == LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_carrier_linear_prepared_cpu(x.data(), n_in, base.data(), nullptr, y.data(), tokens, n_out, n_in,
                                          LCDD_FLOAT32, &bad, 1, odd) == LCDD_ERROR_INVALID_ARGUMENT);
}

void bad_inputs() {
  float x[2 * 4] = {0}, base[3 * 4] = {0}, y[2 * 3], d[2 * 2] = {0};
  int32_t rows[2] = {0, 2}, cols[2] = {1, 3}, unsorted[2] = {2, 0}, oob[2] = {1, 4};
  lcdd_carrier_view good = {d, rows, cols, nullptr, 2, 2};
  int32_t ids_ok[2] = {0, -1}, ids_bad[2] = {1, 0}, ids_neg[2] = {-2, 0};
  EXPECT(lcdd_carrier_linear_cpu(x, 4, base, nullptr, y, 2, 3, 4, LCDD_FLOAT32, &good, 1, ids_ok) == LCDD_OK);
  EXPECT(lcdd_carrier_linear_cpu(x, 4, base, nullptr, y, 2, 3, 4, LCDD_FLOAT32, &good, 1, ids_bad) ==
         LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_carrier_add_cpu(x, 4, y, 2, 3, 4, LCDD_FLOAT32, &good, 1, ids_neg) == LCDD_ERROR_INVALID_ARGUMENT);
  lcdd_carrier_view v = good;
  v.rows = unsorted;
  EXPECT(lcdd_carrier_linear_cpu(x, 4, base, nullptr, y, 2, 3, 4, LCDD_FLOAT32, &v, 1, nullptr) ==
         LCDD_ERROR_INVALID_ARGUMENT);
  v = good;
  v.cols = oob;
  EXPECT(lcdd_carrier_add_cpu(x, 4, y, 2, 3, 4, LCDD_FLOAT32, &v, 1, nullptr) == LCDD_ERROR_INVALID_ARGUMENT);
  v = good;
  v.n_rows = 4;  // more rows than out_features
  EXPECT(lcdd_carrier_add_cpu(x, 4, y, 2, 3, 4, LCDD_FLOAT32, &v, 1, nullptr) == LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_carrier_linear_cpu(x, 3, base, nullptr, y, 2, 3, 4, LCDD_FLOAT32, &good, 1, nullptr) ==
         LCDD_ERROR_INVALID_ARGUMENT);  // row stride below in_features
  EXPECT(lcdd_carrier_linear_cpu(x, 4, nullptr, nullptr, y, 2, 3, 4, LCDD_FLOAT32, &good, 1, nullptr) ==
         LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_carrier_linear_cpu(x, 4, base, nullptr, y, 2, 3, 4, static_cast<lcdd_dtype>(7), &good, 1, nullptr) ==
         LCDD_ERROR_UNSUPPORTED_DTYPE);
  int32_t slots[3];
  EXPECT(lcdd_carrier_row_slots_cpu(unsorted, 2, 3, slots) == LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_carrier_row_slots_cpu(rows, 2, 3, slots) == LCDD_OK);
  EXPECT(slots[0] == 0 && slots[1] == -1 && slots[2] == 1);
  // the CUDA entry points exist in every build; without CUDA they say so
  if (!lcdd_has_cuda())
    EXPECT(lcdd_carrier_linear_cuda(x, 4, base, nullptr, y, 2, 3, 4, LCDD_FLOAT32, &good, 1, nullptr, nullptr) ==
           LCDD_ERROR_NO_CUDA);
}

}  // namespace

int main() {
  const int64_t shapes[][3] = {{1, 37, 29}, {2, 9, 40}, {5, 16, 16}, {16, 50, 70}, {40, 33, 130}, {0, 5, 5}, {3, 7, 0}, {4, 64, 96}};
  for (const auto& s : shapes) {
    for (bool with_ids : {true, false}) {
      const double k = static_cast<double>(s[2]) + 1;
      run_case<float>(LCDD_FLOAT32, s[0], s[1], s[2], with_ids, 1e-5 * k);
      run_case<double>(LCDD_FLOAT64, s[0], s[1], s[2], with_ids, 1e-12 * k);
      // 16-bit: fp32 accumulation, one rounding of an output of magnitude up to ~2k
      run_case<lcdd::bf16_t>(LCDD_BFLOAT16, s[0], s[1], s[2], with_ids, 8e-3 * k);
      run_case<lcdd::half_t>(LCDD_FLOAT16, s[0], s[1], s[2], with_ids, 1e-3 * k);
    }
  }
  // several carriers inside one token chunk, and a whole batch on one carrier
  const int64_t mixed[][3] = {{16, 41, 35}, {40, 33, 130}, {13, 9, 21}};
  for (const auto& s : mixed) {
    for (int pattern : {1, 2}) {
      const double k = static_cast<double>(s[2]) + 1;
      run_case<float>(LCDD_FLOAT32, s[0], s[1], s[2], true, 1e-5 * k, pattern);
      run_case<double>(LCDD_FLOAT64, s[0], s[1], s[2], true, 1e-12 * k, pattern);
      run_case<lcdd::bf16_t>(LCDD_BFLOAT16, s[0], s[1], s[2], true, 8e-3 * k, pattern);
    }
  }
  bad_inputs();
  prepared_ids();
  // conversions round to nearest even and keep specials
  EXPECT(lcdd::to_float(lcdd::to_half(1.0f + 1.0f / 2048)) == 1.0f);  // tie -> even
  EXPECT(lcdd::to_float(lcdd::to_half(65504.0f)) == 65504.0f);
  EXPECT(std::isinf(lcdd::to_float(lcdd::to_half(70000.0f))));
  EXPECT(lcdd::to_float(lcdd::to_half(5.960464477539063e-08f)) == 5.960464477539063e-08f);  // smallest subnormal
  EXPECT(lcdd::to_float(lcdd::to_bf16(1.00390625f)) == 1.0f);  // tie -> even
  EXPECT(std::isnan(lcdd::to_float(lcdd::to_bf16(std::nanf("")))));
  return report();
}
