// C++ unit test of the library-wide entry points.
#include <cstdio>
#include <cstring>

#include "lcdd/lcdd.h"

int main() {
  int failures = 0;
  if (std::strcmp(lcdd_version(), "0.1.0") != 0) { std::printf("version: %s\n", lcdd_version()); ++failures; }
  if (std::strcmp(lcdd_status_string(LCDD_OK), "ok") != 0) ++failures;
  if (lcdd_has_cuda() != 0 && lcdd_has_cuda() != 1) ++failures;
  std::printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
