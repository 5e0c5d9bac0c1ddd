// Built in place of csrc/cuda/*.cu when nvcc is absent: every CUDA entry point of the C API
// exists and returns LCDD_ERROR_NO_CUDA, so programs link the same either way.
#include "lcdd/lcdd.h"
