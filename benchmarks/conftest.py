"""Options and parametrisation for the pytest-benchmark suites.

The shapes come from the same tables as ``lcdd bench`` (lcdd_kernels.bench); heavy shapes
(Llama-3-8B) are skipped on CPU unless ``--bench-heavy`` is given.
"""

import pytest
import torch

from lcdd_kernels.bench import masked_delta
from lcdd_kernels.bench.command import DTYPES

HEAVY_MODELS = {"llama-3-8b"}


def pytest_addoption(parser):
    g = parser.getgroup("lcdd bench")
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    g.addoption("--bench-dtype", default=None, choices=sorted(DTYPES),
                help="default: bfloat16 on CUDA, float32 on CPU")
    g.addoption("--bench-T", type=int, default=None, help="tokens (default: 8192 on CUDA, 256 on CPU)")
    g.addoption("--bench-heavy", action="store_true", help="run the Llama-3-8B shapes on CPU too")


def _device(config) -> str:
    return config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    device = _device(request.config)
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is visible")
    return device


@pytest.fixture(scope="session")
def bench_dtype(request, bench_device) -> str:
    return request.config.getoption("--bench-dtype") or ("bfloat16" if bench_device.startswith("cuda") else "float32")


def pytest_generate_tests(metafunc):
    if "training_case" in metafunc.fixturenames:
        cuda = _device(metafunc.config).startswith("cuda")
        tokens = metafunc.config.getoption("--bench-T") or (8192 if cuda else 256)
        cases = masked_delta.cases(("qwen3-0.6b", "llama-3-8b"), (tokens,))
        metafunc.parametrize("training_case", [
            pytest.param(c, id=c["group"].replace(" ", "-").replace("/", "+"),
                         marks=[pytest.mark.heavy] if c["model"] in HEAVY_MODELS else [])
            for c in cases])


def pytest_collection_modifyitems(config, items):
    if _device(config).startswith("cuda") or config.getoption("--bench-heavy"):
        return
    skip = pytest.mark.skip(reason="heavy shape on CPU (pass --bench-heavy to run it)")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
