// C++ unit test of lcdd_gather_channels_cpu against a naive loop: strided input and output,
// both index widths, 16-bit storage, and the refusal of out-of-range indices.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "expect.h"
#include "lcdd/lcdd.h"

template <typename E, typename I>
void check_case(lcdd_dtype dtype, lcdd_index_dtype idt, int64_t B, int64_t S, int64_t D, bool transposed) {
  std::vector<E> hidden(B * S * D);
  for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = static_cast<E>(i * 7 + 3);
  // Row-major (B, S, D), or (B, D, S) storage read as (B, S, D) through its strides.
  const int64_t sb = S * D, ss = transposed ? 1 : D, sd = transposed ? S : 1;
  std::vector<int64_t> pos(B);
  for (int64_t b = 0; b < B; ++b) pos[b] = (b * 5 + 1) % S;
  const int64_t C = D + 3;  // more channels than D: repeats
  std::vector<I> ch(C);
  for (int64_t c = 0; c < C; ++c) ch[c] = static_cast<I>((c * 11 + 2) % D);
  const int64_t ob = C + 2;  // padded output rows
  std::vector<E> out(B * ob, static_cast<E>(-1));
  EXPECT(lcdd_gather_channels_cpu(hidden.data(), dtype, B, S, D, sb, ss, sd, pos.data(), ch.data(), idt, C,
                                  out.data(), ob, 1) == LCDD_OK);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) EXPECT(out[b * ob + c] == hidden[b * sb + pos[b] * ss + ch[c] * sd]);
    EXPECT(out[b * ob + C] == static_cast<E>(-1) && out[b * ob + C + 1] == static_cast<E>(-1));
  }
}

int main() {
  check_case<float, int64_t>(LCDD_FLOAT32, LCDD_INT64, 3, 7, 13, false);
  check_case<float, int32_t>(LCDD_FLOAT32, LCDD_INT32, 4, 5, 9, true);
  check_case<double, int32_t>(LCDD_FLOAT64, LCDD_INT32, 2, 3, 4, false);
  check_case<uint16_t, int64_t>(LCDD_BFLOAT16, LCDD_INT64, 5, 4, 17, true);
  check_case<uint16_t, int32_t>(LCDD_FLOAT16, LCDD_INT32, 1, 1, 1, false);
  check_case<float, int64_t>(LCDD_FLOAT32, LCDD_INT64, 300, 9, 200, false);  // takes the OpenMP path

  // Out-of-range indices are refused and nothing is written.
  float h[2 * 3 * 4] = {0};
  float out[4] = {5, 5, 5, 5};
  int64_t bad_pos[2] = {0, 3}, good_pos[2] = {0, 2};
  int32_t ch[2] = {1, 3}, bad_ch[2] = {1, 4};
  EXPECT(lcdd_gather_channels_cpu(h, LCDD_FLOAT32, 2, 3, 4, 12, 4, 1, bad_pos, ch, LCDD_INT32, 2, out, 2, 1) ==
         LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_gather_channels_cpu(h, LCDD_FLOAT32, 2, 3, 4, 12, 4, 1, good_pos, bad_ch, LCDD_INT32, 2, out, 2, 1) ==
         LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(out[0] == 5 && out[3] == 5);
  EXPECT(lcdd_gather_channels_cpu(nullptr, LCDD_FLOAT32, 2, 3, 4, 12, 4, 1, good_pos, ch, LCDD_INT32, 2, out, 2, 1) ==
         LCDD_ERROR_INVALID_ARGUMENT);
  EXPECT(lcdd_gather_channels_cpu(h, static_cast<lcdd_dtype>(9), 2, 3, 4, 12, 4, 1, good_pos, ch, LCDD_INT32, 2, out,
                                  2, 1) == LCDD_ERROR_UNSUPPORTED_DTYPE);
  return report();
}
