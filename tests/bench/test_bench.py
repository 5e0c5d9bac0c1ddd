"""The benchmark plumbing (lcdd_kernels.bench) on tiny shapes: rows, ratios, result files, plots,
peak-memory measurement, and that the providers compute the same thing (apples to apples)."""

from __future__ import annotations

import json

import pytest
import torch

from lcdd_kernels import heaviside_st
from lcdd_kernels.bench import masked_delta
from lcdd_kernels.bench.memory import call_peak_bytes, hwm_reset_works, peak_memory_subprocess, rss_call_peak_bytes
from lcdd_kernels.bench.prepared import MEMORY_MODES, MODES, Prepared
from lcdd_kernels.bench.results import SCHEMA, ResultsFile
from lcdd_kernels.bench.rows import add_ratios
from lcdd_kernels.bench.runner import run_matrix
from lcdd_kernels.bench.shapes import projection_shapes
from lcdd_kernels.bench.targets import check_targets, format_targets
from lcdd_kernels.bench.plot import plot_rows
from lcdd_kernels.cli import main as lcdd_main
from lcdd_kernels.ops.masked_delta import masked_delta_linear_ref, masked_delta_swiglu_ref

from tests.helpers.compare import assert_close

TINY_LINEAR = {"group": "tiny 24x16 T=8", "op": "linear", "model": "tiny", "proj": "x", "T": 8, "N": 24, "K": 16}
TINY_SWIGLU = {"group": "tiny swiglu T=8", "op": "swiglu", "model": "tiny", "proj": "gate+up", "T": 8, "N": 24, "K": 16}
MIB = 1 << 20


def test_projection_shapes_follow_the_model_configs():
    assert projection_shapes("qwen3-0.6b") == [
        ("q_proj", 2048, 1024), ("k_proj/v_proj", 1024, 1024), ("o_proj", 1024, 2048),
        ("gate_proj/up_proj", 3072, 1024), ("down_proj", 1024, 3072)]
    assert projection_shapes("llama-3-8b") == [
        ("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 1024, 4096),
        ("gate_proj/up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
    swiglu = [c for c in masked_delta.cases(("llama-3-8b",), (8192,)) if c["op"] == "swiglu"]
    assert [(c["T"], c["N"], c["K"]) for c in swiglu] == [(8192, 14336, 4096)]
    with pytest.raises(ValueError, match="unknown model 'gpt-2'"):
        projection_shapes("gpt-2")


def test_rows_carry_the_required_fields():
    rows = run_matrix("training", masked_delta.PREPARE, [TINY_LINEAR, TINY_SWIGLU], masked_delta.PROVIDERS,
                      MODES, "cpu", torch.float32, "dense", budget_s=0.0, min_reps=1,
                      rss_tries=1, progress=False)
    assert len(rows) == 2 * 3 * 3
    assert not [r["error"] for r in rows if "error" in r]
    for r in rows:
        for key in ("suite", "device", "device_type", "dtype", "date", "group", "op", "T", "N", "K",
                    "provider", "mode", "ms_median", "ms_p20", "ms_p80", "weight_bytes", "state_bytes",
                    "time_vs_baseline", "baseline"):
            assert r.get(key) is not None, (key, r)
        assert set(r["versions"]) >= {"torch", "triton", "transformers", "lcdd_kernels", "python"}
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        if r["mode"] in MEMORY_MODES:
            assert r["peak_bytes"] == r["state_bytes"] + r["call_peak_bytes"]
            assert r["extra_weight_copies"] is not None and r["memory_method"] == "cpu-tensors"
            assert r["rss_peak_bytes"] == r["state_bytes"] + r["rss_call_peak_bytes"]
        else:
            assert r["peak_bytes"] is None
    lcdd = [r for r in rows if r["provider"] == "lcdd"]
    assert {r["backend"] for r in lcdd} == {"torch"}
    dense = [r for r in rows if r["provider"] == "dense"]
    assert all(r["time_vs_baseline"] == 1.0 for r in dense)
    # lcdd and parametrize hold B and the mask logits on top of dense's x and W
    for r in rows:
        if r["provider"] != "dense":
            base = next(d for d in dense if d["group"] == r["group"])
            extra = r["weight_bytes"] + 4 * (r["N"] + r["K"])
            assert r["state_bytes"] - base["state_bytes"] == extra


def _row(group, provider, ms, peak, mode="full", wbytes=100):
    return {"suite": "s", "group": group, "mode": mode, "dtype": "float32", "device": "d", "device_type": "cpu",
            "T": 8, "provider": provider, "ms_median": ms, "peak_bytes": peak, "weight_bytes": wbytes}


def test_ratios_per_group():
    rows = [_row("a", "dense", 2.0, 1000), _row("a", "lcdd", 3.0, 1110), _row("a", "parametrize", 8.0, None),
            _row("b", "dense", 4.0, 500), _row("b", "lcdd", 2.0, 400), _row("a", "dense", 1.0, 10, mode="forward"),
            _row("a", "lcdd", 5.0, 30, mode="forward"), _row("c", "lcdd", 1.0, 1)]
    add_ratios(rows, "dense")
    got = [(r["time_vs_baseline"], r["mem_vs_baseline"], r["extra_weight_copies"]) for r in rows]
    assert got == [(1.0, 1.0, 0.0), (1.5, 1.11, 1.1), (4.0, None, None), (1.0, 1.0, 0.0), (0.5, 0.8, -1.0),
                   (1.0, 1.0, 0.0), (5.0, 3.0, 0.2), (None, None, None)]


def test_targets_report_pass_miss_and_not_measured():
    rows = add_ratios([_row("a", "dense", 2.0, 1000), _row("a", "lcdd", 3.0, 1120),
                       _row("b", "dense", 2.0, 1000), _row("b", "lcdd", 2.0, 1050)], "dense")
    results = check_targets(rows, masked_delta.TARGETS)
    cpu = {r["group"]: (r["status"], r["value"]) for r in results if r["target"] == "cpu-memory"}
    assert cpu == {"a": ("miss", pytest.approx(1.2)), "b": ("pass", pytest.approx(0.5))}
    assert {r["status"] for r in results if r["target"].startswith("gpu")} == {"not measured"}
    text = format_targets(results)
    assert "MISS  a [full]" in text and "PASS  b [full]" in text and "not measured" in text


def _cli(*args):
    return lcdd_main(["bench", "training", "--device", "cpu", "--models", "tiny", "--T", "4", "--ops", "linear",
                      "--modes", "forward", "--budget", "0", "--no-memory", *args])


def test_out_refuses_to_overwrite_then_force_and_append(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("precious")
    assert _cli("--out", str(out)) == 2
    assert out.read_text() == "precious"
    assert "--force" in capsys.readouterr().err
    assert _cli("--out", str(out), "--force") == 0
    first = json.loads(out.read_text())
    assert first["schema"] == SCHEMA and len(first["rows"]) == 4 * 3  # 4 tiny shapes x 3 providers
    assert _cli("--out", str(out), "--append") == 0
    both = json.loads(out.read_text())
    assert both["rows"][:12] == first["rows"] and len(both["rows"]) == 24
    assert len(both["targets"]) == 2 * len(first["targets"])


def test_plot_is_written(tmp_path):
    rows = add_ratios([_row("a", "dense", 2.0, 1000), _row("a", "lcdd", 3.0, 1110),
                       _row("a", "dense", 1.0, None, mode="forward"),
                       _row("a", "lcdd", 1.5, None, mode="forward")], "dense")
    png = plot_rows(rows, tmp_path / "sub" / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = tmp_path / "r.json"
    ResultsFile(res).write(rows)
    assert lcdd_main(["bench", "plot", str(res), "--out", str(png)]) == 2  # exists: refused
    assert lcdd_main(["bench", "plot", str(res), "--out", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_cpu_peak_memory_sees_a_known_allocation():
    def alloc():
        a = torch.ones(64 * MIB // 4)  # 64 MiB, every page touched
        b = torch.ones(1000)  # 4000 bytes on top, while a is alive
        return a, b

    assert call_peak_bytes(alloc, "cpu") == 64 * MIB + 4000  # tensor bytes: exact
    if not hwm_reset_works():
        pytest.skip("VmHWM cannot be reset here (the subprocess fallback is tested below)")
    rss = rss_call_peak_bytes(alloc, tries=2)
    assert 63 * MIB <= rss <= 70 * MIB, rss / MIB


def alloc_prepare(case, provider, device, dtype):
    """A 'provider' whose forward allocates (and touches) case['mib'] MiB."""
    return Prepared(lambda: torch.ones(case["mib"] * MIB // 4), [], [], MIB)


def test_peak_memory_subprocess_fallback():
    got = peak_memory_subprocess(f"{__name__}:alloc_prepare", {"mib": 96}, "x", "cpu", "float32", "forward")
    assert 95 * MIB <= got["rss_call_peak_bytes"] <= 104 * MIB, got


def _grads(prep, dy):
    y = prep.forward()
    y.backward(dy)
    return y.detach(), [p.grad for p in prep.params]


@pytest.mark.parametrize("case", [TINY_LINEAR, TINY_SWIGLU], ids=["linear", "swiglu"])
def test_providers_compute_the_same_thing(case):
    """parametrize and lcdd against the float64 reference, on the same inputs (mask logits centred
    at 0 so that about half of every mask is off), output and every gradient."""
    dense = masked_delta.prepare(case, "dense", "cpu", "float32")
    par = masked_delta.prepare(case, "parametrize", "cpu", "float32", mask_mean=0.0)
    lcdd = masked_delta.prepare(case, "lcdd", "cpu", "float32", mask_mean=0.0)
    assert torch.equal(dense.params[0], par.params[0]) and torch.equal(dense.params[1], lcdd.params[1])

    # reference: the same tensors in float64, masks through the straight-through Heaviside
    leaves = [p.detach().double().requires_grad_() for p in lcdd.params]
    bases = [lcdd.state[i].double() for i in ((2,) if case["op"] == "linear" else (2, 4))]  # B (and B_up)
    masks = [heaviside_st(t) for t in leaves[-2:]]
    x = leaves[0]
    if case["op"] == "linear":
        ref = masked_delta_linear_ref(x, leaves[1], bases[0], *masks)
    else:
        ref = masked_delta_swiglu_ref(x, leaves[1], bases[0], leaves[2], bases[1], *masks)
    assert 0.2 < float(masks[0].detach().mean()) < 0.8, "the masks should have entries off"
    dy = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dy)
    # the Triton designs (under TRITON_INTERPRET=1 here, as tests/conftest.py sets it without a GPU)
    designs = {d: masked_delta.prepare(case, d, "cpu", "float32", mask_mean=0.0) for d in masked_delta.DESIGN_PROVIDERS}
    assert {p.info["design"] for p in designs.values()} == {"fused", "split"}
    for name, prep in (("parametrize", par), ("lcdd", lcdd), *designs.items()):
        y, grads = _grads(prep, dy.float())
        assert_close(f"{name} y", y, ref.detach(), dtype=torch.float32, factor=0)
        for i, (g, leaf) in enumerate(zip(grads, leaves)):
            assert_close(f"{name} grad {i}", g, leaf.grad, dtype=torch.float32, factor=0)
