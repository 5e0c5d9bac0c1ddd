"""Shared test setup. Triton kernels run under the interpreter when no GPU is present; that
switch must be set before any Triton kernel is defined, hence here, before the tests import."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


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
