"""Every public name of the benchmark plumbing, in one namespace, for suites written against it.

The plumbing lives in one module per job; new code imports from there:

* :mod:`.shapes`: model dimensions and projection shapes (``MODEL_DIMS``, ``projection_shapes``);
* :mod:`.prepared`: what a suite hands the runner (``Prepared``, ``MODES``, ``mode_callable``, ``resolve``);
* :mod:`.timing`: ``time_call``, ``time_interleaved``, ``quantiles_ms``, ``call_ms``;
* :mod:`.memory`: peak memory (``call_peak_bytes``, ``rss_call_peak_bytes``, ``peak_memory_subprocess``);
* :mod:`.rows`: row stamps and ratios (``stamp``, ``make_row``, ``add_ratios``, ``device_name``);
* :mod:`.results`: results files (``ResultsFile``, ``load_results``, ``SCHEMA``);
* :mod:`.runner`: the matrix runner (``run_matrix``);
* :mod:`.targets` and :mod:`.tables`: ``Target``, ``check_targets``, ``format_table``, ``COLUMNS``;
* :mod:`.command`: the suites' options and ending (``add_common_arguments``, ``DTYPES``, ``report``).

This module only re-exports them; nothing in the job modules imports it.
"""

from __future__ import annotations

from .command import (  # noqa: F401
    DTYPES,
    add_common_arguments,
    csv_of,
    open_results,
    report,
    resolve_device_dtype,
)
from .memory import (  # noqa: F401
    MIB,
    call_peak_bytes,
    hwm_reset_works,
    peak_memory_subprocess,
    rss_call_peak_bytes,
    tensor_call_peak_bytes,
)
from .prepared import MEMORY_MODES, MODES, Prepared, mode_callable, resolve, zero_grads  # noqa: F401
from .results import SCHEMA, ResultsFile, load_results  # noqa: F401
from .rows import GROUP_KEYS, add_ratios, device_name, make_row, stamp, versions  # noqa: F401
from .runner import run_matrix  # noqa: F401
from .shapes import MODEL_DIMS, projection_shapes  # noqa: F401
from .tables import COLUMNS, _f, format_table  # noqa: F401 (_f: the suites' cell formatter)
from .targets import Target, check_targets, format_targets  # noqa: F401
from .timing import call_ms, quantiles_ms, time_call, time_interleaved  # noqa: F401
