"""Shared test setup. Triton kernels run under the interpreter when no GPU is present; that
switch must be set before any Triton kernel is defined, hence here, before the tests import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """A fixed seed, and one intra-op thread: the tests' tiny ops gain nothing from threads, and
    on a loaded 2-core machine OpenMP barriers wait for descheduled threads (seen: a 0.03 ms
    elementwise op taking 7 ms). Restored after each test, so a test may set its own count."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Hypothesis profiles (HYPOTHESIS_PROFILE selects one; "ci" is the default of `make test`):
# "ci" runs few, derandomized examples (the same cases every run: CI cannot go red by chance);
# "fuzz" (`make fuzz`) runs many random ones. No deadline: the Triton interpreter's first call
# of a kernel compiles it.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter):
    """The fuzz suites' case counts (tests/helpers/fuzz_report.py), when any ran."""
    from tests.helpers.fuzz_report import summary

    lines = summary()
    if lines:
        terminalreporter.section("fuzz cases checked (op/backend/dtype)")
        for line in lines:
            terminalreporter.write_line(line)
