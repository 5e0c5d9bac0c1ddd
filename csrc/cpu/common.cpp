// Library-wide entry points of the C API: version, status strings, build flags.
#include "lcdd/lcdd.h"

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

int lcdd_has_cuda(void) {
#ifdef LCDD_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
