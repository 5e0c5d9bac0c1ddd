"""The roofline table covers every GPU shape of the training and carrier benches, its floors follow
from the peaks, and the committed results file is the one the code writes."""

import json
import pathlib

from lcdd_kernels.bench import carrier, masked_delta, roofline

RESULTS = pathlib.Path(__file__).resolve().parents[1] / roofline.DEFAULT_FILE


def test_results_file_is_current():
    assert json.loads(RESULTS.read_text())["rows"] == json.loads(json.dumps(roofline.table()))


def test_every_gpu_shape_and_provider_has_a_floor():
    rows = roofline.table()
    have = {(r["suite"], r["group"], r["provider"], r["mode"]) for r in rows}
    for (dev, _), (models, tokens) in masked_delta.PLANS.items():
        if dev == "cuda":
            for case in masked_delta.cases(models, tokens):
                for p in masked_delta.PROVIDERS + masked_delta.DESIGN_PROVIDERS:
                    assert {("training", case["group"], p, m) for m in ("forward", "backward", "full")} <= have
    for (dev, _), (models, projs, tokens, sparsities, mixes, _) in carrier.PLANS.items():
        if dev == "cuda":
            for case in carrier.cases(models, tokens, sparsities, mixes, projs):
                assert {("carrier", case["group"], p, "forward") for p in carrier.PROVIDERS} <= have


def test_floors_and_orderings():
    rows = {(r["suite"], r["group"], r["provider"], r["mode"]): r for r in roofline.table()}
    for r in rows.values():
        assert r["floor_ms"] == max(r["flops"] / roofline.PEAK_FLOPS, r["bytes"] / roofline.PEAK_BYTES_S) * 1e3
    g = "llama-3-8b gate_proj/up_proj T=8192"
    dense, lcdd = rows[("training", g, "dense", "forward")], rows[("training", g, "lcdd", "forward")]
    # same GEMM, and the masked delta reads B besides W: one weight more
    assert lcdd["flops"] == dense["flops"] == 2 * 8192 * 14336 * 4096
    assert lcdd["bytes"] - dense["bytes"] == 2 * 14336 * 4096 + 2 * (14336 + 4096)
    assert rows[("training", g, "lcdd-split", "forward")]["bytes"] > lcdd["bytes"]
    c = "qwen3-0.6b o_proj T=1 s=0.8 mix=0"
    assert rows[("carrier", c, "lcdd", "forward")]["bytes"] == rows[("carrier", c, "base", "forward")]["bytes"]


def test_compare_reports_fraction_of_floor(tmp_path):
    row = next(r for r in roofline.table() if r["suite"] == "training")
    measured = dict(suite="training", group=row["group"], provider=row["provider"], mode=row["mode"],
                    ms_median=2 * row["floor_ms"])
    (tmp_path / "r.json").write_text(json.dumps({"rows": [measured]}))
    (out,) = roofline.compare([str(tmp_path / "r.json"), str(tmp_path / "missing.json")], str(RESULTS))
    assert abs(out["of_roofline"] - 0.5) < 1e-12


def test_compiled_providers_share_their_eager_floor():
    rows = {(r["suite"], r["group"], r["provider"], r["mode"]): r for r in roofline.table()}
    compiled = [k for k in rows if k[2].endswith("-compiled")]
    assert compiled  # the carrier suite's lcdd-compiled
    for suite, group, provider, mode in compiled:
        eager = rows[(suite, group, provider.removesuffix("-compiled"), mode)]
        assert (rows[(suite, group, provider, mode)]["bytes"], rows[(suite, group, provider, mode)]["flops"]) == (
            eager["bytes"], eager["flops"])
    # a compiled training provider, should one be added, gets the same rule
    for op in (roofline._linear_costs, roofline._swiglu_costs):
        assert op("lcdd-compiled", 64, 4096, 1024) == op("lcdd", 64, 4096, 1024)


def test_compare_says_which_measured_rows_have_no_floor(tmp_path, capsys):
    measured = dict(suite="training", group="no such shape", provider="lcdd", mode="forward", ms_median=1.0)
    (tmp_path / "r.json").write_text(json.dumps({"rows": [measured]}))
    assert roofline.compare([str(tmp_path / "r.json")], str(RESULTS)) == []
    assert "1 measured rows have no floor" in capsys.readouterr().out
