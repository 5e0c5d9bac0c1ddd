"""Test-only Triton kernels for tests/test_kernel_check.py: one that spills, one that does not
compile, one that is clean and one that nothing launches. Never part of the package."""
