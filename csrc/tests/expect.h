// The C++ unit tests' one check: EXPECT(cond) prints the failing condition and counts it; each
// test's main returns report(), so ctest sees a non-zero exit when any check failed.
#pragma once
#include <cstdio>

static int failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::printf("%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

static inline int report() {
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
