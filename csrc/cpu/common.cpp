// Library-wide entry points of the C API: version, status strings, build flags.
#include <atomic>

#include "internal.h"
#include "lcdd/lcdd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
std::atomic<int> g_threads{0};
}  // namespace

int lcdd::threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

#define LCDD_STR2(x) #x
#define LCDD_STR(x) LCDD_STR2(x)

extern "C" {

const char* lcdd_status_string(lcdd_status status) {
  switch (status) {
    case LCDD_OK: return "ok";
    case LCDD_ERROR_INVALID_ARGUMENT: return "invalid argument";
    case LCDD_ERROR_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case LCDD_ERROR_NO_CUDA: return "library built without CUDA";
    case LCDD_ERROR_CUDA: return "CUDA runtime error";
  }
  return "unknown status";
}

const char* lcdd_version(void) {
  return LCDD_STR(LCDD_VERSION_MAJOR) "." LCDD_STR(LCDD_VERSION_MINOR) "." LCDD_STR(LCDD_VERSION_PATCH);
}

lcdd_status lcdd_set_num_threads(int n) {
  if (n < 0) return LCDD_ERROR_INVALID_ARGUMENT;
  g_threads.store(n, std::memory_order_relaxed);
  return LCDD_OK;
}

int lcdd_get_num_threads(void) { return lcdd::threads(); }

int lcdd_has_cuda(void) {
#ifdef LCDD_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
