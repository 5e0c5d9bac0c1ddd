"""One module per op: reference, kernels, launchers, and its registered ``torch.ops.lcdd.*`` op.

Importing this package registers every op (it imports torch only: no Triton, no compiled
extension, no GPU), so ``import lcdd_kernels.ops`` is enough to call ``torch.ops.lcdd.<op>``.
"""

from . import carrier, gather, masked_delta  # noqa: F401 (registers torch.ops.lcdd.*)
