"""One module per op: reference, kernels, launchers, autograd Function."""
