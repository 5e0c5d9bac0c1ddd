// C++ unit test of the library-wide entry points.
#include <cstdio>
#include <cstring>

#include "expect.h"
#include "lcdd/lcdd.h"

int main() {
  if (std::strcmp(lcdd_version(), "0.1.0") != 0) std::printf("version: %s\n", lcdd_version());
  EXPECT(std::strcmp(lcdd_version(), "0.1.0") == 0);
  EXPECT(std::strcmp(lcdd_status_string(LCDD_OK), "ok") == 0);
  EXPECT(lcdd_has_cuda() == 0 || lcdd_has_cuda() == 1);
  return report();
}
