// Serving two carriers from C++ through the plain C API of liblcdd (no libtorch, no Python):
// three tokens, the first with carrier 0, the second with none, the third with carrier 1.
// Build: CMake target `carrier_example` (ctest runs it), or
//   g++ -std=c++17 carrier_example.cpp -I csrc/include -L build/cmake -llcdd -fopenmp
#include <cmath>
#include <cstdio>
#include <vector>

#include "lcdd/lcdd.h"

int main() {
  const int64_t tokens = 3, n_out = 4, n_in = 6;
  std::vector<float> x(tokens * n_in), base(n_out * n_in), y(tokens * n_out);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i % 7) - 0.3f;
  for (size_t i = 0; i < base.size(); ++i) base[i] = 0.05f * static_cast<float>(i % 5) - 0.1f;

  // Carrier 0 changes output rows {1, 3} from input columns {0, 2, 5}; carrier 1 row {0} from column {4}.
  std::vector<int32_t> rows0 = {1, 3}, cols0 = {0, 2, 5}, rows1 = {0}, cols1 = {4};
  std::vector<float> delta0 = {0.5f, -0.25f, 1.0f, 0.75f, 0.0f, -1.0f};  // (2, 3) row-major
  std::vector<float> delta1 = {2.0f};                                    // (1, 1)
  const lcdd_carrier_view carriers[2] = {
      {delta0.data(), rows0.data(), cols0.data(), nullptr, 2, 3},  // row_slots: only CUDA needs them
      {delta1.data(), rows1.data(), cols1.data(), nullptr, 1, 1},
  };
  const int32_t ids[3] = {0, -1, 1};

  lcdd_status s = lcdd_carrier_linear_cpu(x.data(), n_in, base.data(), /*bias=*/nullptr, y.data(), tokens, n_out,
                                          n_in, LCDD_FLOAT32, carriers, 2, ids);
  if (s != LCDD_OK) {
    std::printf("lcdd_carrier_linear_cpu: %s\n", lcdd_status_string(s));
    return 1;
  }

  // Check against the definition: y = x·baseᵀ, then y[t, rows_c] += x[t, cols_c]·delta_cᵀ.
  int bad = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t n = 0; n < n_out; ++n) {
      double want = 0;
      for (int64_t k = 0; k < n_in; ++k) want += x[t * n_in + k] * base[n * n_in + k];
      const int c = ids[t];
      const std::vector<int32_t>& rows = c == 0 ? rows0 : rows1;
      const std::vector<int32_t>& cols = c == 0 ? cols0 : cols1;
      const std::vector<float>& delta = c == 0 ? delta0 : delta1;
      for (size_t j = 0; c >= 0 && j < rows.size(); ++j)
        if (rows[j] == n)
          for (size_t i = 0; i < cols.size(); ++i) want += delta[j * cols.size() + i] * x[t * n_in + cols[i]];
      std::printf("%8.4f%s", y[t * n_out + n], n + 1 < n_out ? " " : "\n");
      bad += std::fabs(y[t * n_out + n] - want) > 1e-5;
    }
  }
  std::printf("liblcdd %s (CUDA kernels: %s): %s\n", lcdd_version(), lcdd_has_cuda() ? "yes" : "no",
              bad ? "MISMATCH" : "ok");
  return bad ? 1 : 0;
}
