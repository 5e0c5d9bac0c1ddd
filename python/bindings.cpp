// pybind11 module lcdd_kernels._C over the C API. Pointers arrive as integers (tensor.data_ptr());
// lcdd_kernels validates shapes, dtypes, devices and contiguity before any pointer crosses.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "lcdd/lcdd.h"

namespace py = pybind11;

namespace {
void check(lcdd_status s, const char* what) {
  if (s != LCDD_OK) throw std::runtime_error(std::string(what) + ": " + lcdd_status_string(s));
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lcdd-kernels native kernels (C API bindings)";
  m.def("version", &lcdd_version);
  m.def("has_cuda", []() { return lcdd_has_cuda() != 0; });
  (void)check;
}
