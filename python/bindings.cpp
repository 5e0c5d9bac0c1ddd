// pybind11 module lcdd_kernels._C over the C API. Pointers arrive as integers (tensor.data_ptr());
// lcdd_kernels validates shapes, dtypes, devices and contiguity before any pointer crosses, so a
// non-OK status here means a bug or a misuse of _C directly: it raises RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lcdd/lcdd.h"

namespace py = pybind11;

static_assert(sizeof(lcdd_carrier_view) == 6 * sizeof(int64_t),
              "lcdd_carrier_view must match the int64 (n, 6) tables built by lcdd_kernels");

namespace {

void check(lcdd_status s, const char* what) {
  if (s != LCDD_OK) throw std::runtime_error(std::string(what) + ": " + lcdd_status_string(s));
}

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lcdd-kernels native kernels (C API bindings)";
  m.def("version", &lcdd_version);
  m.def("has_cuda", []() { return lcdd_has_cuda() != 0; });
  m.def("set_num_threads", [](int n) { check(lcdd_set_num_threads(n), "lcdd_set_num_threads"); });
  m.def("get_num_threads", &lcdd_get_num_threads);

  m.def(
      "gather_channels_cpu",
      [](std::uintptr_t hidden, int dtype, int64_t batch, int64_t seq, int64_t dim, int64_t sb,
         int64_t ss, int64_t sd, std::uintptr_t positions, std::uintptr_t channels, int ch_dtype,
         int64_t n_ch, std::uintptr_t out, int64_t ob, int64_t oc) {
        py::gil_scoped_release nogil;
        check(lcdd_gather_channels_cpu(ptr<const void>(hidden), static_cast<lcdd_dtype>(dtype), batch,
                                       seq, dim, sb, ss, sd, ptr<const int64_t>(positions),
                                       ptr<const void>(channels), static_cast<lcdd_index_dtype>(ch_dtype),
                                       n_ch, ptr<void>(out), ob, oc),
              "lcdd_gather_channels_cpu");
      });

  m.def("carrier_row_slots_cpu", [](std::uintptr_t rows, int64_t n_rows, int64_t n_out, std::uintptr_t slots) {
    check(lcdd_carrier_row_slots_cpu(ptr<const int32_t>(rows), n_rows, n_out, ptr<int32_t>(slots)),
          "lcdd_carrier_row_slots_cpu");
  });

  // carrier_linear_{cpu,cuda}(x, x_stride, base, bias, y, tokens, n_out, n_in, dtype, views, n_views, ids[, stream])
  // carrier_add_{cpu,cuda}(x, x_stride, y, tokens, n_out, n_in, dtype, views, n_views, ids[, stream])
  // views: address of an int64 (n_views, 6) array laid out as lcdd_carrier_view; ids: int32 or 0.
  m.def("carrier_linear_cpu", [](std::uintptr_t x, int64_t xs, std::uintptr_t base, std::uintptr_t bias,
                                 std::uintptr_t y, int64_t tokens, int64_t n_out, int64_t n_in, int dtype,
                                 std::uintptr_t views, int64_t n_views, std::uintptr_t ids) {
    py::gil_scoped_release nogil;
    check(lcdd_carrier_linear_cpu(ptr<const void>(x), xs, ptr<const void>(base), ptr<const void>(bias), ptr<void>(y),
                                  tokens, n_out, n_in, static_cast<lcdd_dtype>(dtype),
                                  ptr<const lcdd_carrier_view>(views), n_views, ptr<const int32_t>(ids)),
          "lcdd_carrier_linear_cpu");
  });
  m.def("carrier_add_cpu", [](std::uintptr_t x, int64_t xs, std::uintptr_t y, int64_t tokens, int64_t n_out,
                              int64_t n_in, int dtype, std::uintptr_t views, int64_t n_views, std::uintptr_t ids) {
    py::gil_scoped_release nogil;
    check(lcdd_carrier_add_cpu(ptr<const void>(x), xs, ptr<void>(y), tokens, n_out, n_in,
                               static_cast<lcdd_dtype>(dtype), ptr<const lcdd_carrier_view>(views), n_views,
                               ptr<const int32_t>(ids)),
          "lcdd_carrier_add_cpu");
  });
  // the prepared entry points (views checked once by carrier_check_cpu): same arguments as above
  m.def("carrier_check_cpu", [](std::uintptr_t views, int64_t n_views, int64_t n_out, int64_t n_in) {
    return lcdd_carrier_check_cpu(ptr<const lcdd_carrier_view>(views), n_views, n_out, n_in) == LCDD_OK;
  });
  m.def("carrier_linear_prepared_cpu", [](std::uintptr_t x, int64_t xs, std::uintptr_t base, std::uintptr_t bias,
                                          std::uintptr_t y, int64_t tokens, int64_t n_out, int64_t n_in, int dtype,
                                          std::uintptr_t views, int64_t n_views, std::uintptr_t ids) {
    py::gil_scoped_release nogil;
    check(lcdd_carrier_linear_prepared_cpu(ptr<const void>(x), xs, ptr<const void>(base), ptr<const void>(bias),
                                           ptr<void>(y), tokens, n_out, n_in, static_cast<lcdd_dtype>(dtype),
                                           ptr<const lcdd_carrier_view>(views), n_views, ptr<const int32_t>(ids)),
          "lcdd_carrier_linear_prepared_cpu");
  });
  m.def("carrier_add_prepared_cpu", [](std::uintptr_t x, int64_t xs, std::uintptr_t y, int64_t tokens,
                                       int64_t n_out, int64_t n_in, int dtype, std::uintptr_t views, int64_t n_views,
                                       std::uintptr_t ids) {
    py::gil_scoped_release nogil;
    check(lcdd_carrier_add_prepared_cpu(ptr<const void>(x), xs, ptr<void>(y), tokens, n_out, n_in,
                                        static_cast<lcdd_dtype>(dtype), ptr<const lcdd_carrier_view>(views),
                                        n_views, ptr<const int32_t>(ids)),
          "lcdd_carrier_add_prepared_cpu");
  });
  m.def("carrier_linear_cuda", [](std::uintptr_t x, int64_t xs, std::uintptr_t base, std::uintptr_t bias,
                                  std::uintptr_t y, int64_t tokens, int64_t n_out, int64_t n_in, int dtype,
                                  std::uintptr_t views, int64_t n_views, std::uintptr_t ids, std::uintptr_t stream) {
    check(lcdd_carrier_linear_cuda(ptr<const void>(x), xs, ptr<const void>(base), ptr<const void>(bias),
                                   ptr<void>(y), tokens, n_out, n_in, static_cast<lcdd_dtype>(dtype),
                                   ptr<const lcdd_carrier_view>(views), n_views, ptr<const int32_t>(ids),
                                   reinterpret_cast<lcdd_stream>(stream)),
          "lcdd_carrier_linear_cuda");
  });
  m.def("carrier_add_cuda", [](std::uintptr_t x, int64_t xs, std::uintptr_t y, int64_t tokens, int64_t n_out,
                               int64_t n_in, int dtype, std::uintptr_t views, int64_t n_views, std::uintptr_t ids,
                               std::uintptr_t stream) {
    check(lcdd_carrier_add_cuda(ptr<const void>(x), xs, ptr<void>(y), tokens, n_out, n_in,
                                static_cast<lcdd_dtype>(dtype), ptr<const lcdd_carrier_view>(views), n_views,
                                ptr<const int32_t>(ids), reinterpret_cast<lcdd_stream>(stream)),
          "lcdd_carrier_add_cuda");
  });
}
