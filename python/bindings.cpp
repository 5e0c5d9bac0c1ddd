// pybind11 module lcdd_kernels._C over the C API. Pointers arrive as integers (tensor.data_ptr());
// lcdd_kernels validates shapes, dtypes, devices and contiguity before any pointer crosses, so a
// non-OK status here means a bug or a misuse of _C directly: it raises RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lcdd/lcdd.h"

namespace py = pybind11;

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
}
