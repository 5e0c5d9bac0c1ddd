"""pytest-benchmark: the masked-delta training providers side by side (dense, parametrize, lcdd).

Providers and setup are those of ``lcdd bench training`` (lcdd_kernels.bench.masked_delta); one
benchmark group per shape and mode, so pytest-benchmark's table compares providers directly.
Run: ``pytest benchmarks/`` (options in benchmarks/conftest.py).
"""

import pytest
import torch

from lcdd_kernels.bench import masked_delta
from lcdd_kernels.bench.command import DTYPES
from lcdd_kernels.bench.prepared import MODES, mode_callable, zero_grads
from lcdd_kernels.bench.rows import stamp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", masked_delta.PROVIDERS)
def test_masked_delta_training(benchmark, training_case, provider, mode, bench_device, bench_dtype):
    prep = masked_delta.prepare(training_case, provider, bench_device, bench_dtype)
    fn = mode_callable(prep, mode)
    cuda = torch.device(bench_device).type == "cuda"

    def call():
        fn()
        if cuda:
            torch.cuda.synchronize()

    benchmark.group = f"{training_case['group']} {mode}"
    benchmark.extra_info.update(stamp(bench_device, DTYPES[bench_dtype]), **training_case,
                                provider=provider, mode=mode, **prep.info)
    benchmark.pedantic(call, setup=lambda: zero_grads(prep.params), rounds=20 if cuda else 5,
                       warmup_rounds=2 if cuda else 1)
