"""``python -m lcdd_kernels.kernel_check``: the check without the rest of the CLI (for an
environment with only torch and triton, such as the old-Triton one of ``make check-kernels-old``)."""

import sys

from lcdd_kernels.cli.check_kernels import main

sys.exit(main())
