// Test-only CUDA source for tests/test_kernel_check.py: does not compile.
__global__ void broken(float* y) { y[threadIdx.x] = undeclared_name; }
