"""lcdd check-kernels can fail: test-only kernels (tests/kernel_check/fixtures) that spill, do not
compile or are never launched are reported as such, a clean one passes. Compiles for real
(Triton for sm_90/sm_80 and ptxas from the triton wheel; no GPU needed)."""

import pathlib
import shutil

import pytest

from lcdd_kernels.kernel_check import discovery, occupancy, sass

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from lcdd_kernels.kernel_check import check_kernels

    out = tmp_path_factory.mktemp("kc")
    return check_kernels(dtypes=("float32",), archs=(90, 80), jobs=2, cache_dir=str(out / "cache"),
                         out_json=str(out / "table.json"), sources=((str(FIXTURES), "tests.kernel_check.fixtures"),),
                         scenario_modules=("tests.kernel_check.fixtures.kernels",), autotune_modes=("1",),
                         cuda=False, echo=lambda *a: None)


def _rows(report, kernel):
    rows = [r for r in report["triton_rows"] if r["kernel"] == kernel]
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    return rows


def test_spilling_kernel_is_reported(report):
    for r in _rows(report, "_spilling_kernel"):
        assert r["status"] == "spill", r
        assert r["spill_store_bytes"] > 0 and r["spill_load_bytes"] > 0
        assert r["local_loads"] > 0 and r["local_stores"] > 0


def test_kernel_that_does_not_compile_is_reported(report):
    for r in _rows(report, "_broken_kernel"):
        assert r["status"] == "error" and r["error"], r


def test_clean_kernel_passes_with_its_specialisation(report):
    for r in _rows(report, "_clean_kernel"):
        assert r["status"] == "ok", r
        assert r["spill_store_bytes"] == 0 and r["local_loads"] == 0
        # the JIT's own specialisation: CPU allocations are 16-byte aligned, n = 4096 divisible by 16
        assert set(r["aligned"]) == {"x_ptr", "out_ptr", "n"}
        assert 0 < r["occupancy"] <= 1


def test_uncovered_kernel_and_overall_failure(report):
    assert report["uncovered"] == ["tests.kernel_check.fixtures.kernels._never_launched_kernel"]
    assert report["ok"] is False
    assert report["counts"] == {"spill": 2, "error": 2, "ok": 2}


def test_cache_returns_the_same_rows(report):
    from lcdd_kernels.kernel_check import check_kernels

    # Same cache directory as the fixture: every successful compile is served from it.
    first = {(r["kernel"], r["arch"]): r for r in report["triton_rows"]}
    again = check_kernels(dtypes=("float32",), archs=(90, 80), jobs=2, cache_dir=report["cache_dir"],
                          sources=((str(FIXTURES), "tests.kernel_check.fixtures"),),
                          scenario_modules=("tests.kernel_check.fixtures.kernels",), autotune_modes=("1",),
                          cuda=False, echo=lambda *a: None)
    for r in again["triton_rows"]:
        assert r["cached"] == (r["status"] != "error")
        if r["status"] != "error":
            assert r["registers"] == first[(r["kernel"], r["arch"])]["registers"]


def test_discovery_finds_every_jit_function():
    found = discovery.jit_functions(FIXTURES, "tests.kernel_check.fixtures")
    assert found == {"tests.kernel_check.fixtures.kernels": [
        "_spilling_kernel", "_broken_kernel", "_clean_kernel", "_never_launched_kernel"]}


def test_sass_counts_and_ptxas_report():
    code = """
        /*0190*/                   LDL.64 R4, [R1+0x10] ;
        /*01a0*/              @!P0 STL [R1+0x8], R2 ;
        /*01b0*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*01c0*/                   LDL R6, [R1] ;
    """
    assert sass.sass_counts(code) == {"local_loads": 2, "local_stores": 1, "mma": "wgmma"}
    assert sass.sass_counts("/*0010*/ HMMA.16816.F32.BF16 R0, R4, R8, R0 ;")["mma"] == "mma.sync"
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    968 bytes stack frame, 1756 bytes spill stores, 1752 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 968 bytes cumulative stack size\n")
    assert sass.ptxas_usage(log, "k") == {"registers": 255, "stack_bytes": 968, "spill_store_bytes": 1756,
                                          "spill_load_bytes": 1752}


def test_occupancy_limits():
    # 128 threads at 128 registers: 16K registers a block, 4 blocks = 16 warps of 64
    assert occupancy.occupancy(90, 128, 0, 4) == {"blocks_per_sm": 4, "occupancy": 0.25}
    # shared memory bound: 100 KiB a block leaves room for 2 on sm_90, 1 on sm_80
    assert occupancy.occupancy(90, 32, 100 * 1024, 4)["blocks_per_sm"] == 2
    assert occupancy.occupancy(80, 32, 100 * 1024, 4)["blocks_per_sm"] == 1
    # more than a block may have cannot launch at all
    assert occupancy.occupancy(80, 32, 200 * 1024, 4)["blocks_per_sm"] == 0


_KEYED = '''
import triton
import triton.language as tl


@triton.jit
def _helper(x):
    return x * {scale}


@triton.jit
def _kernel(x_ptr):
    tl.store(x_ptr, _helper(tl.load(x_ptr)))
'''


def _import(path, name, text):
    import importlib.util
    import sys

    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cache_key_ignores_where_a_kernel_sits_but_not_what_it_says(tmp_path, monkeypatch):
    from lcdd_kernels.kernel_check.runner import source_keys

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # JITFunctions, as the check's recording process has

    names = ("_helper", "_kernel")
    variants = {"same": _KEYED.format(scale=2), "moved": "# a config list grew\n" * 7 + _KEYED.format(scale=2),
                "helper edited": _KEYED.format(scale=3)}
    mods = {v: _import(tmp_path / f"kc_key_{i}.py", f"kc_key_{i}", text) for i, (v, text) in enumerate(variants.items())}
    # Triton's own key moves with the line (what recompiled most of the check on a config-list edit)
    assert mods["same"]._kernel.cache_key != mods["moved"]._kernel.cache_key
    keys = {v: source_keys([(m.__name__, n) for n in names]) for v, m in mods.items()}
    kernel = {v: k[(mods[v].__name__, "_kernel")] for v, k in keys.items()}
    assert kernel["same"] == kernel["moved"]
    assert kernel["helper edited"] != kernel["same"]  # the helper's source is in its caller's key


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA half of the check)")
def test_cuda_spill_and_compile_error_fail_the_check():
    """The CUDA half has no allowlist: a spilling instantiation or a source that does not compile
    makes the whole check fail; the clean kernel beside them is reported clean."""
    from lcdd_kernels.kernel_check import cuda_sources, report

    rows = cuda_sources.check((90, 80), root=str(FIXTURES / "cuda_root"), echo=lambda *a: None)
    by = {(r["function"].split("(")[0], r["arch"]): r for r in rows}
    assert set(by) == {(f, a) for f in ("spilling", "clean") for a in ("sm_90", "sm_80")}
    for arch in ("sm_90", "sm_80"):
        spill, clean = by["spilling", arch], by["clean", arch]
        assert spill["status"] == "spill" and spill["registers"] <= 32, spill
        assert spill["spill_store_bytes"] > 0 and spill["spill_load_bytes"] > 0
        assert clean["status"] == "ok" and clean["spill_store_bytes"] == clean["spill_load_bytes"] == 0
    broken = cuda_sources.check((90,), root=str(FIXTURES / "cuda_broken"), echo=lambda *a: None)
    assert [r["status"] for r in broken] == ["error"] and "undeclared_name" in broken[0]["error"]

    def verdict(cuda_rows):
        return report.build([], cuda_rows, uncovered=[], problems=[], triton="-", python="-", seconds=0)["ok"]

    assert verdict([by["clean", a] for a in ("sm_90", "sm_80")]) is True
    assert verdict(rows) is False
    assert verdict(broken) is False



def _device_matching():
    """In a worker with TRITON_INTERPRET=0 (kernels defined for the compiler, as on a GPU): for a
    sample of real launches, the rows of the table that device.matches pairs with each one's
    CompiledKernel."""
    import torch

    from lcdd_kernels.kernel_check import compile as kc, device, record, report, scenarios

    with record.recording() as rec:
        for name, run in scenarios.scenarios("float32"):
            if name.startswith("gather_channels_into") or name.startswith("carrier_add_ T=16 "):
                rec.origin = f"float32 {name}"
                run()
        # and one launch that differs from a recorded one only in alignment: `out` 4 bytes off
        from lcdd_kernels.ops import gather_triton

        rec.origin = "float32 gather_channels_into C=64 index=int32, out misaligned"
        hidden = torch.zeros(16, 32, 4096)
        out = torch.empty(16 * 64 + 1)[1:].view(16, 64)
        gather_triton.gather_channels_into(out, hidden, torch.zeros(16, dtype=torch.int64),
                                           torch.zeros(64, dtype=torch.int32))
    launches = list(rec.launches.values())
    compiled = [kc.compile_kernel(launch, 90) for launch in launches]
    rows = [report.row(launch, 90, kc.compile_launch(launch, 90), False) for launch in launches]
    own = [[j for j, r in enumerate(rows) if device.matches(r, fn, kernel)] for fn, kernel, *_ in compiled]
    return rows, own


def test_device_comparison_finds_each_kernels_own_row():
    """On the GPU, gpu_check.sh compares the driver's registers for every kernel a real launch
    compiled with the row of the check's table for the same launch (kernel_check/device.py). Here,
    with CompiledKernels from the same path (what the JIT caches), each one must match exactly its
    own launch's row (same constexprs, config, signature and alignment) and no other."""
    import json

    from lcdd_kernels.kernel_check import runner

    with runner._worker_pool(1, {"TRITON_INTERPRET": "0"}) as pool:
        rows, own = pool.submit(_device_matching).result()
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    # The sample holds launches of one kernel that differ in config only, and in signature only.
    assert sorted(by_kernel) == ["_carrier_add_kernel", "_gather_channels_kernel"], sorted(by_kernel)
    gather = by_kernel["_gather_channels_kernel"]
    assert len({json.dumps(r["config"]) for r in gather}) > 1
    assert len({json.dumps(r["signature"]) for r in gather}) > 1
    off = [r for r in gather if "misaligned" in r["scenario"]]
    assert len(off) == 1 and "out_ptr" not in off[0]["aligned"]
    assert any(r["config"] == off[0]["config"] and r["signature"] == off[0]["signature"] and "out_ptr" in r["aligned"]
               for r in gather)
    assert own == [[i] for i in range(len(rows))], [(rows[i]["scenario"], o) for i, o in enumerate(own)]
