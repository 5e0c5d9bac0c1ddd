// Sparse carriers on the CPU (SPEC §4): the fused base-plus-carriers projection and the carrier
// part alone, one carrier per token. Both are built on one register-blocked micro-kernel: 4 weight
// (or delta) rows times 16 tokens whose inputs are stored token-innermost, so the innermost loop runs
// over tokens and vectorises without reassociating any sum. OpenMP over (token chunk, row block)
// tasks. Accumulation is in fp32 (fp64 for float64) with one rounding per output element.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "internal.h"

// Python builds int64 (n, 6) tables that the kernels read as lcdd_carrier_view.
static_assert(sizeof(lcdd_carrier_view) == 48 && offsetof(lcdd_carrier_view, row_slots) == 24 &&
                  offsetof(lcdd_carrier_view, n_rows) == 32 && offsetof(lcdd_carrier_view, n_cols) == 40,
              "lcdd_carrier_view layout");

namespace {

using lcdd::from_acc;
using lcdd::to_float;

template <typename T>
using Acc = typename lcdd::acc<T>::type;

constexpr int kTok = 16;           // tokens per micro-kernel (the vectorised dimension)
constexpr int kRows = 4;           // weight rows per micro-kernel
constexpr int64_t kRowBlock = 16;  // output rows per task of the fused kernel
constexpr int64_t kAddRows = 64;   // carrier rows per task of the add kernel

// Eight lanes of accumulators as one GCC/Clang vector value (an AVX register; two SSE ones in a
// portable build): the four rows' sums over kTok tokens stay in registers across the reduction.
template <typename A> struct Lanes;
template <> struct Lanes<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct Lanes<double> { typedef double type __attribute__((vector_size(32))); };

// out[r][k] = Σ_i w[r][i]·xg[i·kTok + k] for r < nr (<= kRows).
template <typename T>
inline void micro(const T* const* w, int nr, int64_t n, const Acc<T>* xg, Acc<T> (*out)[kTok]) {
  using A = Acc<T>;
  using V = typename Lanes<A>::type;
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(A)), P = kTok / L;  // P vectors per row
  static_assert(kTok % L == 0, "kTok must be a multiple of the vector lanes");
  // fewer than kRows rows repeat the first (in L1 already); their sums are not stored
  const T *w0 = w[0], *w1 = w[nr > 1 ? 1 : 0], *w2 = w[nr > 2 ? 2 : 0], *w3 = w[nr > 3 ? 3 : 0];
  V a0[P] = {}, a1[P] = {}, a2[P] = {}, a3[P] = {};
  for (int64_t i = 0; i < n; ++i) {
    const A s0 = static_cast<A>(to_float(w0[i])), s1 = static_cast<A>(to_float(w1[i]));
    const A s2 = static_cast<A>(to_float(w2[i])), s3 = static_cast<A>(to_float(w3[i]));
    for (int p = 0; p < P; ++p) {
      V xv;
      std::memcpy(&xv, xg + i * kTok + p * L, sizeof xv);
      a0[p] += s0 * xv;
      a1[p] += s1 * xv;
      a2[p] += s2 * xv;
      a3[p] += s3 * xv;
    }
  }
  std::memcpy(out[0], a0, sizeof a0);
  if (nr > 1) std::memcpy(out[1], a1, sizeof a1);
  if (nr > 2) std::memcpy(out[2], a2, sizeof a2);
  if (nr > 3) std::memcpy(out[3], a3, sizeof a3);
}

// xg[i·kTok + k] = x[tok[k], cols[i]] (cols == nullptr: column i) for k < nt and tok[k] >= 0, else 0.
template <typename T>
inline void gather_tokens(const T* x, int64_t xs, const int64_t* tok, int nt, const int32_t* cols, int64_t n,
                          Acc<T>* xg) {
  for (int k = 0; k < kTok; ++k) {
    if (k >= nt || tok[k] < 0) {
      for (int64_t i = 0; i < n; ++i) xg[i * kTok + k] = 0;
      continue;
    }
    const T* xr = x + tok[k] * xs;
    if (cols) {
      for (int64_t i = 0; i < n; ++i) xg[i * kTok + k] = to_float(xr[cols[i]]);
    } else {
      for (int64_t i = 0; i < n; ++i) xg[i * kTok + k] = to_float(xr[i]);
    }
  }
}

// The few-token path (up to kFewTokens tokens would leave most of the micro-kernel's token lanes
// empty): dot4 for one token, dot_block below for two to four.

// One token (a decode step of one sequence): Σ_i w_r[i]·v[i] for four rows at once, four
// independent accumulator chains, so the GEMV of a decode step is bound by memory, not by the
// latency of one chain of fused multiply-adds. `V` is T (x read in place) or Acc<T> (x gathered at
// a carrier's columns).
template <typename T, typename V>
inline void dot4(const T* const* w, const V* v, int64_t n, Acc<T>* out) {
  Acc<T> s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  const T *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const Acc<T> vi = static_cast<Acc<T>>(to_float(v[i]));
    s0 += static_cast<Acc<T>>(to_float(w0[i])) * vi;
    s1 += static_cast<Acc<T>>(to_float(w1[i])) * vi;
    s2 += static_cast<Acc<T>>(to_float(w2[i])) * vi;
    s3 += static_cast<Acc<T>>(to_float(w3[i])) * vi;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// L consecutive elements from p as one vector of accumulator lanes (16-bit types widened).
template <typename V, typename S>
inline V load_lanes(const S* p) {
  using A = decltype(V{}[0] + 0);
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(A));
  V v;
  if constexpr (sizeof(S) == sizeof(A)) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<S, lcdd::bf16_t> && L == 8) {
    // bf16 is the top half of an fp32: widen the eight 16-bit words and shift (vectorised; the
    // element-wise loop below compiles to scalar conversions)
    typedef uint16_t H __attribute__((vector_size(16)));
    typedef uint32_t W __attribute__((vector_size(32)));
    H h;
    std::memcpy(&h, p, sizeof h);
    const W u = __builtin_convertvector(h, W) << 16;
    std::memcpy(&v, &u, sizeof v);
  } else {
    A tmp[L];
    for (int j = 0; j < L; ++j) tmp[j] = static_cast<A>(to_float(p[j]));
    std::memcpy(&v, tmp, sizeof v);
  }
  return v;
}

// The first rem (< L) elements from p, the other lanes 0 (nothing read past p + rem).
template <typename V, typename S>
inline V load_tail(const S* p, int rem) {
  using A = decltype(V{}[0] + 0);
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(A));
#ifdef __AVX2__
  if constexpr (std::is_same_v<S, float> && std::is_same_v<A, float> && L == 8) {
    // one masked load (masked-off lanes are not read, so no fault past the row) for the scalar loop
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 v = _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), lane));
    V out;
    std::memcpy(&out, &v, sizeof out);
    return out;
  }
#endif
  A tmp[L] = {};
  for (int j = 0; j < rem; ++j) tmp[j] = static_cast<A>(to_float(p[j]));
  V v;
  std::memcpy(&v, tmp, sizeof v);
  return v;
}

// Σ_i w_r[i]·v_k[i] for R rows and K tokens at once (out[r][k]): the columns are the vector
// dimension and R·K accumulator vectors stay in registers, so each row is read once for the K tokens
// (a decode batch of a few sequences reads the weight once, not once per sequence) and R·K >= 6
// independent chains keep the FMA units busy. `S` is T (x read in place) or Acc<T> (gathered).
template <int R, int K, typename T, typename S>
inline void dot_block(const T* const* w, const S* const* v, int64_t n, Acc<T> (*out)[kTok]) {
  using A = Acc<T>;
  using V = typename Lanes<A>::type;
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(A));
  V acc[R][K] = {};
  int64_t i = 0;
  if constexpr (R * K < 8) {  // two column steps per iteration: 2·R·K chains, not R·K latency-bound ones
    V acc2[R][K] = {};
    for (; i + 2 * L <= n; i += 2 * L) {
      V wv[R], wv2[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = load_lanes<V>(w[r] + i);
        wv2[r] = load_lanes<V>(w[r] + i + L);
      }
      for (int k = 0; k < K; ++k) {
        const V xv = load_lanes<V>(v[k] + i), xv2 = load_lanes<V>(v[k] + i + L);
        for (int r = 0; r < R; ++r) {
          acc[r][k] += wv[r] * xv;
          acc2[r][k] += wv2[r] * xv2;
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) acc[r][k] += acc2[r][k];
  }
  for (; i + L <= n; i += L) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_lanes<V>(w[r] + i);
    for (int k = 0; k < K; ++k) {
      V xv = load_lanes<V>(v[k] + i);
#if defined(__GNUC__) && defined(__AVX__)
      // one load per token vector: GCC otherwise folds the load into each row's FMA (R loads),
      // and at R·K + R loads per R·K FMAs the loop waits on the two load ports, not the FMA units
      asm("" : "+x"(xv));
#endif
      for (int r = 0; r < R; ++r) acc[r][k] += wv[r] * xv;
    }
  }
  if (i < n) {  // the last n % L columns as one zero-filled vector step, not R·K scalar dots
    const int rem = static_cast<int>(n - i);
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_tail<V>(w[r] + i, rem);
    for (int k = 0; k < K; ++k) {
      const V xv = load_tail<V>(v[k] + i, rem);
      for (int r = 0; r < R; ++r) acc[r][k] += wv[r] * xv;
    }
  }
#ifdef __AVX2__
  if constexpr (std::is_same_v<A, float> && L == 8 && R * K == 8) {
    // the eight horizontal sums at once: three rounds of pairwise adds (hadd, hadd, the two
    // 128-bit halves) leave sum(acc[r][k]) in lane r·K + k. Summing each vector on its own costs
    // about as much as the 205-column loop it ends (7 dependent adds x 8).
    __m256 a[8];
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) std::memcpy(&a[r * K + k], &acc[r][k], sizeof(__m256));
    const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
    float sums[8];
    _mm256_storeu_ps(sums, s);
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) out[r][k] = sums[r * K + k];
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < K; ++k) {
      A lanes[L];
      std::memcpy(lanes, &acc[r][k], sizeof lanes);
      A sum = 0;
      for (int j = 0; j < L; ++j) sum += lanes[j];
      out[r][k] = sum;
    }
  }
}

// Token counts up to this use the dot path.
constexpr int kFewTokens = 4;

// The inputs of a chunk of tokens for rows_times_tokens: token-innermost for the micro-kernel, or
// one contiguous run per token for the dot path (cols == nullptr: nothing to gather there).
template <typename T>
inline void prepare_tokens(const T* x, int64_t xs, const int64_t* tok, int nt, const int32_t* cols, int64_t n,
                           Acc<T>* xg) {
  if (nt > kFewTokens) {
    gather_tokens(x, xs, tok, nt, cols, n, xg);
    return;
  }
  for (int k = 0; k < nt && cols; ++k) {
    if (tok[k] < 0) continue;
    const T* xr = x + tok[k] * xs;
    for (int64_t i = 0; i < n; ++i) xg[k * n + i] = to_float(xr[cols[i]]);
  }
}

// out[r][k] = Σ_i w[r][i]·x[tok[k], cols[i]] for r < nr, k < nt (tok[k] < 0: 0), from the inputs
// prepare_tokens left in xg.
template <typename T>
inline void rows_times_tokens(const T* const* w, int nr, const T* x, int64_t xs, const int64_t* tok, int nt,
                              const int32_t* cols, int64_t n, const Acc<T>* xg, Acc<T> (*out)[kTok]) {
  if (nt > kFewTokens) {
    micro(w, nr, n, xg, out);
    return;
  }
  // fewer than four rows (a carrier's few rows inside an output block) repeat the first: fewer
  // chains would make the dot latency-bound, and the repeated row is in L1 already
  const T* w4[kRows];
  for (int r = 0; r < kRows; ++r) w4[r] = w[r < nr ? r : 0];
  int live[kFewTokens];
  int m = 0;
  for (int k = 0; k < nt; ++k) {
    if (tok[k] < 0) {
      for (int r = 0; r < nr; ++r) out[r][k] = 0;
    } else {
      live[m++] = k;
    }
  }
  if (m == 0) return;
  Acc<T> o[kRows][kTok];
  auto run = [&](auto src) {  // src(k): token k's inputs, gathered or in place
    using S = std::remove_const_t<std::remove_pointer_t<decltype(src(0))>>;
    const S* v[kFewTokens];
    for (int q = 0; q < m; ++q) v[q] = src(live[q]);
    switch (m) {
      case 1: {  // the single-token GEMV, measured on par with MKL's (one accumulator set, no unrolling)
        Acc<T> o1[kRows];
        dot4(w4, v[0], n, o1);
        for (int r = 0; r < kRows; ++r) o[r][0] = o1[r];
        break;
      }
      case 2: dot_block<4, 2, T>(w4, v, n, o); break;
      case 3:
        dot_block<2, 3, T>(w4, v, n, o);
        dot_block<2, 3, T>(w4 + 2, v, n, o + 2);
        break;
      default:
        dot_block<2, 4, T>(w4, v, n, o);
        dot_block<2, 4, T>(w4 + 2, v, n, o + 2);
    }
  };
  if (cols) run([&](int k) { return xg + static_cast<int64_t>(k) * n; });
  else run([&](int k) { return x + tok[k] * xs; });
  for (int q = 0; q < m; ++q)
    for (int r = 0; r < nr; ++r) out[r][live[q]] = o[r][q];
}

// Which tokens use which carrier; `used` lists carriers with tokens and a non-empty delta.
struct Routing {
  std::vector<std::vector<int64_t>> tokens;
  std::vector<int64_t> used;
};

// Ids outside [0, n_carriers) route nowhere: -1, and on the prepared entry points any id a caller
// did not check (a checked call has refused them before).
Routing route(const lcdd_carrier_view* cv, int64_t n_carriers, const int32_t* ids, int64_t tokens) {
  Routing r;
  r.tokens.resize(static_cast<size_t>(n_carriers));
  if (ids) {
    for (int64_t t = 0; t < tokens; ++t)
      if (ids[t] >= 0 && ids[t] < n_carriers) r.tokens[ids[t]].push_back(t);
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

// The carriers' sizes and pointers (O(carriers)); with `indices`, also every row and column index
// (O(their count): what the prepared entry points leave to lcdd_carrier_check_cpu, once).
lcdd_status check_views(const lcdd_carrier_view* cv, int64_t n_carriers, int64_t n_out, int64_t n_in,
                        bool indices) {
  if (n_carriers < 0 || n_out < 0 || n_in < 0 || (n_carriers > 0 && !cv)) return LCDD_ERROR_INVALID_ARGUMENT;
  for (int64_t c = 0; c < n_carriers; ++c) {
    const lcdd_carrier_view& v = cv[c];
    if (v.n_rows < 0 || v.n_cols < 0 || v.n_rows > n_out || v.n_cols > n_in) return LCDD_ERROR_INVALID_ARGUMENT;
    if (v.n_rows == 0 || v.n_cols == 0) continue;
    if (!v.delta || !v.rows || !v.cols) return LCDD_ERROR_INVALID_ARGUMENT;
    if (indices && (!strictly_increasing_below(v.rows, v.n_rows, n_out) ||
                    !strictly_increasing_below(v.cols, v.n_cols, n_in)))
      return LCDD_ERROR_INVALID_ARGUMENT;
  }
  return LCDD_OK;
}

lcdd_status validate(const void* x, int64_t x_stride, const void* y, int64_t tokens, int64_t n_out,
                     int64_t n_in, const lcdd_carrier_view* cv, int64_t n_carriers, const int32_t* ids,
                     bool indices = true) {
  if (tokens < 0 || n_out < 0 || n_in < 0 || n_carriers < 0) return LCDD_ERROR_INVALID_ARGUMENT;
  if (tokens > 0 && n_in > 0 && (!x || x_stride < n_in)) return LCDD_ERROR_INVALID_ARGUMENT;
  if (tokens > 0 && n_out > 0 && !y) return LCDD_ERROR_INVALID_ARGUMENT;
  if (indices && ids)
    for (int64_t t = 0; t < tokens; ++t)
      if (ids[t] < -1 || ids[t] >= n_carriers) return LCDD_ERROR_INVALID_ARGUMENT;
  return check_views(cv, n_carriers, n_out, n_in, indices);
}

// f(0) .. f(n - 1): shared out over the enclosing parallel region's threads (`team`), or a plain
// loop (a serial call must not bind an orphaned `omp for` to a caller's parallel region).
template <typename F>
inline void static_tasks(bool team, int64_t n, F&& f) {
  if (!team) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp for schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i);
}

template <typename F>
inline void dynamic_tasks(bool team, int64_t n, F&& f) {
  if (!team) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp for schedule(dynamic)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// Per-thread scratch that only grows: a decode-sized call allocates (and zero-fills) nothing.
template <typename A>
A* scratch(int slot, int64_t n) {
  thread_local std::vector<A> buf[2];
  if (static_cast<int64_t>(buf[slot].size()) < n) buf[slot].resize(static_cast<size_t>(n));
  return buf[slot].data();
}

// The fused projection. Tasks are (chunk of kTok tokens, block of kRowBlock output rows): the base
// rows of the block, then, per carrier used by a token of the chunk, its rows inside the block with
// x gathered at its columns for its own tokens of the chunk (compacted).
template <typename T>
void linear(const T* x, int64_t xs, const T* base, const T* bias, T* y, int64_t tokens, int64_t n_out,
            int64_t n_in, const lcdd_carrier_view* cv, const Routing& rt) {
  const int64_t chunks = (tokens + kTok - 1) / kTok, blocks = (n_out + kRowBlock - 1) / kRowBlock;
  std::vector<int32_t> carrier_of(static_cast<size_t>(tokens), -1);
  int64_t max_cols = 0;
  for (int64_t c : rt.used) {
    for (int64_t t : rt.tokens[c]) carrier_of[t] = static_cast<int32_t>(c);
    max_cols = std::max(max_cols, cv[c].n_cols);
  }
  const int64_t tasks = chunks * blocks;
  const bool par = tasks > 1 && tokens * n_out * n_in > lcdd::kMinParallelWork;
  // a serial call skips the parallel region: entering one, even with if(false), costs a
  // microsecond or two, which a decode step pays per projection
  auto body = [&](bool team) {
    // scratch: x of a chunk, token-innermost (base rows: every column; carriers: their columns);
    // a few-token chunk reads the base columns of x in place
    Acc<T>* const xb = scratch<Acc<T>>(0, tokens > kFewTokens ? n_in * kTok : 0);
    // each used carrier's columns of x for the chunk, gathered once per chunk (not per row block:
    // a decode step would otherwise gather them N / kRowBlock times)
    const int64_t xg_stride = max_cols * kTok;
    Acc<T>* const xg = scratch<Acc<T>>(1, static_cast<int64_t>(rt.used.size()) * xg_stride);
    int64_t xb_chunk = -1, xg_chunk = -1;
    Acc<T> acc[kRowBlock][kTok];
    Acc<T> part[kRows][kTok];
    static_tasks(team, tasks, [&](int64_t task) {
      const int64_t ch = task / blocks, n0 = (task % blocks) * kRowBlock, n1 = std::min(n_out, n0 + kRowBlock);
      const int64_t t0 = ch * kTok;
      const int nt = static_cast<int>(std::min<int64_t>(kTok, tokens - t0));
      int64_t all[kTok];
      for (int k = 0; k < kTok; ++k) all[k] = k < nt ? t0 + k : -1;
      if (xb_chunk != ch) {  // a static schedule walks a chunk's blocks in a row
        prepare_tokens(x, xs, all, nt, nullptr, n_in, xb);
        xb_chunk = ch;
      }
      for (int64_t r0 = n0; r0 < n1; r0 += kRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kRows, n1 - r0));
        const T* w[kRows];
        for (int r = 0; r < nr; ++r) w[r] = base + (r0 + r) * n_in;
        rows_times_tokens(w, nr, x, xs, all, nt, nullptr, n_in, xb, acc + (r0 - n0));
      }
      for (int64_t n = n0; n < n1; ++n) {
        const Acc<T> b = bias ? static_cast<Acc<T>>(to_float(bias[n])) : Acc<T>(0);
        for (int k = 0; k < kTok; ++k) acc[n - n0][k] += b;
      }
      const bool gather = xg_chunk != ch;
      xg_chunk = ch;
      for (size_t u = 0; u < rt.used.size(); ++u) {
        const int64_t c = rt.used[u];
        // the carrier's tokens of the chunk, compacted (lane q is the chunk's token pos[q]): with
        // several carriers in a chunk each computes its own tokens only, not every lane masked
        int64_t tok[kTok];
        int pos[kTok];
        int m = 0;
        for (int k = 0; k < nt; ++k) {
          if (carrier_of[t0 + k] != c) continue;
          tok[m] = t0 + k;
          pos[m++] = k;
        }
        if (m == 0) continue;
        for (int q = m; q < kTok; ++q) tok[q] = -1;
        const lcdd_carrier_view& v = cv[c];
        Acc<T>* const xgc = xg + static_cast<int64_t>(u) * xg_stride;
        if (gather) prepare_tokens(x, xs, tok, m, v.cols, v.n_cols, xgc);
        const int64_t j0 = std::lower_bound(v.rows, v.rows + v.n_rows, static_cast<int32_t>(n0)) - v.rows;
        const int64_t j1 = std::lower_bound(v.rows + j0, v.rows + v.n_rows, static_cast<int32_t>(n1)) - v.rows;
        if (j0 == j1) continue;
        const T* delta = static_cast<const T*>(v.delta);
        for (int64_t j = j0; j < j1; j += kRows) {
          const int nr = static_cast<int>(std::min<int64_t>(kRows, j1 - j));
          const T* w[kRows];
          for (int r = 0; r < nr; ++r) w[r] = delta + (j + r) * v.n_cols;
          rows_times_tokens(w, nr, x, xs, tok, m, v.cols, v.n_cols, xgc, part);
          for (int r = 0; r < nr; ++r)
            for (int q = 0; q < m; ++q) acc[v.rows[j + r] - n0][pos[q]] += part[r][q];  // lanes past m are unset
        }
      }
      for (int k = 0; k < nt; ++k)
        for (int64_t n = n0; n < n1; ++n) y[(t0 + k) * n_out + n] = from_acc<T>(acc[n - n0][k]);
    });
  };
  if (par) {
#pragma omp parallel num_threads(lcdd::threads())
    body(true);
  } else {
    body(false);
  }
}

// The carrier part alone. Tasks are (carrier, chunk of its tokens, block of its rows): x gathered at
// the carrier's columns (once per thread while its tasks stay on one chunk: a dynamic schedule
// hands a thread the chunk's next row block), then the delta rows through the micro-kernel into a
// token-major tile, added into y one token at a time. Writing y row by row as the micro-kernel
// yields it would touch kTok lines n_out apart per row (the same L1 set when n_out·sizeof(T) is a
// multiple of 4 KiB): that scatter cost as much as the arithmetic.
template <typename T>
void add(const T* x, int64_t xs, T* y, int64_t n_out, const lcdd_carrier_view* cv, const Routing& rt) {
  struct Task { int64_t c, tok, row; };
  std::vector<Task> tasks;
  int64_t max_cols = 0, work = 0;
  for (int64_t c : rt.used) {
    max_cols = std::max(max_cols, cv[c].n_cols);
    const int64_t nt = static_cast<int64_t>(rt.tokens[c].size());
    work += nt * cv[c].n_rows * cv[c].n_cols;
    for (int64_t tok = 0; tok < nt; tok += kTok)
      for (int64_t row = 0; row < cv[c].n_rows; row += kAddRows) tasks.push_back({c, tok, row});
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const bool par = n_tasks > 1 && work > lcdd::kMinParallelWork;
  auto body = [&](bool team) {
    Acc<T>* const xg = scratch<Acc<T>>(1, max_cols * kTok);
    int64_t xg_c = -1, xg_tok = -1;
    Acc<T> part[kRows][kTok];
    Acc<T> tile[kTok][kAddRows];
    dynamic_tasks(team, n_tasks, [&](int64_t it) {
      const Task& task = tasks[it];
      const lcdd_carrier_view& v = cv[task.c];
      const int64_t* tok = rt.tokens[task.c].data() + task.tok;
      const int nt = static_cast<int>(std::min<int64_t>(kTok, static_cast<int64_t>(rt.tokens[task.c].size()) - task.tok));
      if (xg_c != task.c || xg_tok != task.tok) {
        prepare_tokens(x, xs, tok, nt, v.cols, v.n_cols, xg);
        xg_c = task.c;
        xg_tok = task.tok;
      }
      const T* delta = static_cast<const T*>(v.delta);
      const int64_t j1 = std::min(v.n_rows, task.row + kAddRows);
      for (int64_t j = task.row; j < j1; j += kRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kRows, j1 - j));
        const T* w[kRows];
        for (int r = 0; r < nr; ++r) w[r] = delta + (j + r) * v.n_cols;
        rows_times_tokens(w, nr, x, xs, tok, nt, v.cols, v.n_cols, xg, part);
        for (int r = 0; r < nr; ++r)
          for (int k = 0; k < nt; ++k) tile[k][j - task.row + r] = part[r][k];
      }
      const int32_t* rows = v.rows + task.row;
      const int64_t nj = j1 - task.row;
      for (int k = 0; k < nt; ++k) {
        T* const yk = y + tok[k] * n_out;
        for (int64_t j = 0; j < nj; ++j)
          yk[rows[j]] = from_acc<T>(static_cast<Acc<T>>(to_float(yk[rows[j]])) + tile[k][j]);
      }
    });
  };
  if (par) {
#pragma omp parallel num_threads(lcdd::threads())
    body(true);
  } else {
    body(false);
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

}  // extern "C"

namespace {

lcdd_status linear_entry(const void* x, int64_t x_stride, const void* base, const void* bias, void* y,
                         int64_t tokens, int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                         const lcdd_carrier_view* carriers, int64_t n_carriers, const int32_t* ids, bool checked) {
  lcdd_status s = validate(x, x_stride, y, tokens, out_features, in_features, carriers, n_carriers, ids, checked);
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

lcdd_status add_entry(const void* x, int64_t x_stride, void* y, int64_t tokens, int64_t out_features,
                      int64_t in_features, lcdd_dtype dtype, const lcdd_carrier_view* carriers, int64_t n_carriers,
                      const int32_t* ids, bool checked) {
  lcdd_status s = validate(x, x_stride, y, tokens, out_features, in_features, carriers, n_carriers, ids, checked);
  if (s != LCDD_OK) return s;
  return lcdd::dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (tokens == 0 || out_features == 0) return LCDD_OK;
    add(static_cast<const T*>(x), x_stride, static_cast<T*>(y), out_features, carriers,
        route(carriers, n_carriers, ids, tokens));
    return LCDD_OK;
  });
}

}  // namespace

extern "C" {

lcdd_status lcdd_carrier_linear_cpu(const void* x, int64_t x_stride, const void* base, const void* bias,
                                    void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                    lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                    int64_t n_carriers, const int32_t* ids) {
  return linear_entry(x, x_stride, base, bias, y, tokens, out_features, in_features, dtype, carriers, n_carriers,
                      ids, true);
}

lcdd_status lcdd_carrier_add_cpu(const void* x, int64_t x_stride, void* y, int64_t tokens,
                                 int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                                 const lcdd_carrier_view* carriers, int64_t n_carriers, const int32_t* ids) {
  return add_entry(x, x_stride, y, tokens, out_features, in_features, dtype, carriers, n_carriers, ids, true);
}

lcdd_status lcdd_carrier_check_cpu(const lcdd_carrier_view* carriers, int64_t n_carriers, int64_t out_features,
                                   int64_t in_features) {
  return check_views(carriers, n_carriers, out_features, in_features, true);
}

lcdd_status lcdd_carrier_linear_prepared_cpu(const void* x, int64_t x_stride, const void* base, const void* bias,
                                             void* y, int64_t tokens, int64_t out_features, int64_t in_features,
                                             lcdd_dtype dtype, const lcdd_carrier_view* carriers,
                                             int64_t n_carriers, const int32_t* ids) {
  return linear_entry(x, x_stride, base, bias, y, tokens, out_features, in_features, dtype, carriers, n_carriers,
                      ids, false);
}

lcdd_status lcdd_carrier_add_prepared_cpu(const void* x, int64_t x_stride, void* y, int64_t tokens,
                                          int64_t out_features, int64_t in_features, lcdd_dtype dtype,
                                          const lcdd_carrier_view* carriers, int64_t n_carriers,
                                          const int32_t* ids) {
  return add_entry(x, x_stride, y, tokens, out_features, in_features, dtype, carriers, n_carriers, ids, false);
}

}  // extern "C"
