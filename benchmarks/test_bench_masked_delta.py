"""pytest-benchmark: the masked-delta training providers side by side (dense, parametrize, lcdd).

Providers and setup are those of ``lcdd bench training`` (lcdd_kernels.bench.training); one
benchmark group per shape and mode, so pytest-benchmark's table compares providers directly.
Run: ``pytest benchmarks/`` (options in benchmarks/conftest.py).
"""

import pytest
import torch

from lcdd_kernels.bench import common, training


@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("provider", training.PROVIDERS)
def test_masked_delta_training(benchmark, training_case, provider, mode, bench_device, bench_dtype):
    prep = training.prepare(training_case, provider, bench_device, bench_dtype)
    fn = common.mode_callable(prep, mode)
    cuda = torch.device(bench_device).type == "cuda"

    def call():
        fn()
        if cuda:
            torch.cuda.synchronize()

    benchmark.group = f"{training_case['group']} {mode}"
    benchmark.extra_info.update(common.stamp(bench_device, common.DTYPES[bench_dtype]), **training_case,
                                provider=provider, mode=mode, **prep.info)
    benchmark.pedantic(call, setup=lambda: common.zero_grads(prep.params), rounds=20 if cuda else 5,
                       warmup_rounds=2 if cuda else 1)
