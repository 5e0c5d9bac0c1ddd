"""The roofline table: floors written out by hand for known shapes, the orderings and
monotonicity any correct cost model has, checks shown to catch a planted error, coverage of every
GPU shape of the masked-delta (``lcdd bench training``) and carrier benches, and the committed
results file being the one the code writes."""

import json
import pathlib

import pytest

from lcdd_kernels.bench import carrier, masked_delta, roofline

RESULTS = pathlib.Path(__file__).resolve().parents[2] / roofline.DEFAULT_FILE
LLAMA_GATE = "llama-3-8b gate_proj/up_proj T=8192"  # T 8192, N 14336, K 4096
QWEN_O_DECODE = "qwen3-0.6b o_proj T=1 s=0.8 mix=0"  # T 1, N 1024, K 2048, no carrier in the batch


def _rows():
    return {(r["suite"], r["group"], r["provider"], r["mode"]): r for r in roofline.table()}


def test_a_compute_bound_training_shape_by_hand():
    rows = _rows()
    dense = rows[("training", LLAMA_GATE, "dense", "forward")]
    # 2·T·N·K = 2·8192·14336·4096
    assert dense["flops"] == 962_072_674_304
    # bf16: x read (T·K), y written (T·N), W read (N·K): 2·(33 554 432 + 117 440 512 + 58 720 256)
    assert dense["bytes"] == 419_430_400
    # 962.07 GFLOP at 790 TFLOP/s = 1.2178 ms, above 419 MB at 4.3 TB/s = 0.098 ms
    assert dense["bound"] == "compute"
    assert dense["floor_ms"] == pytest.approx(1.2178135, rel=1e-6)
    lcdd = rows[("training", LLAMA_GATE, "lcdd", "forward")]
    # the same GEMM; B read besides W (117 440 512 bytes) and both masks (2·(14336 + 4096))
    assert (lcdd["flops"], lcdd["bytes"]) == (962_072_674_304, 536_907_776)
    back = rows[("training", LLAMA_GATE, "lcdd", "backward")]
    # dx and P = Gᵀ X: two GEMMs; G read (T·N), X read and dx written (2·T·K), W and B read and
    # dW written (3·N·K), the masks read and their gradients written (2·(N + K)), all bf16
    assert back["flops"] == 1_924_145_348_608
    assert back["bytes"] == 369_098_752 + 352_321_536 + 73_728


def test_a_memory_bound_decode_shape_by_hand():
    base = _rows()[("carrier", QWEN_O_DECODE, "base", "forward")]
    assert base["flops"] == 4_194_304  # 2·1·1024·2048
    assert base["bytes"] == 4_200_448  # 2·(1024·2048 + 2048 + 1024): the weight dominates
    # 4.2 MB at 4.3 TB/s = 0.977 µs, above 4.2 MFLOP at 790 TFLOP/s = 5.3 ns
    assert base["bound"] == "memory"
    assert base["floor_ms"] == pytest.approx(0.00097685, rel=1e-4)


def ordering_errors(rows: dict) -> list[str]:
    """What a correct cost model never shows, for every training group and mode: providers that do
    different FLOPs (they all compute the same GEMMs), a masked-delta projection moving no more
    bytes than dense (it reads B too), split moving no more than fused (it writes W_eff and reads it back),
    or parametrize moving no more than lcdd (it builds W_eff in fp32); a backward that is not
    twice the forward's GEMM work; ``full`` other than forward plus backward."""
    errors = []
    for (suite, group, provider, mode), r in rows.items():
        if suite != "training" or provider != "dense":
            continue
        get = {p: rows[(suite, group, p, mode)] for p in ("dense", "lcdd", "lcdd-fused", "lcdd-split", "parametrize")}
        if len({g["flops"] for g in get.values()}) != 1:
            errors.append(f"{group} {mode}: providers differ in FLOPs")
        by = {p: g["bytes"] for p, g in get.items()}
        if not by["lcdd"] == by["lcdd-fused"] < by["lcdd-split"]:
            errors.append(f"{group} {mode}: bytes not lcdd = lcdd-fused < lcdd-split: {by}")
        # (the fused SwiGLU reads x once and never writes g, u apart: at many tokens it moves less than dense)
        if r["op"] == "linear" and not by["dense"] < by["lcdd"]:
            errors.append(f"{group} {mode}: bytes not dense < lcdd: {by}")
        if not by["parametrize"] > by["lcdd"]:
            errors.append(f"{group} {mode}: parametrize moves no more bytes than lcdd: {by}")
        if mode == "full":
            fwd, bwd = rows[(suite, group, provider, "forward")], rows[(suite, group, provider, "backward")]
            if bwd["flops"] != 2 * fwd["flops"]:
                errors.append(f"{group}: backward FLOPs {bwd['flops']} != 2 x forward {fwd['flops']}")
            if (r["flops"], r["bytes"]) != (fwd["flops"] + bwd["flops"], fwd["bytes"] + bwd["bytes"]):
                errors.append(f"{group}: full is not forward + backward")
    return errors


def test_providers_are_ordered_as_their_algorithms_move_memory():
    assert ordering_errors(_rows()) == []


def test_the_ordering_check_catches_a_masked_delta_that_forgets_to_read_the_base(monkeypatch):
    # planted error: lcdd costed as dense (B never read)
    real = roofline._linear_costs
    monkeypatch.setattr(roofline, "_linear_costs",
                        lambda p, *a, **k: real("dense" if p == "lcdd" else p, *a, **k))
    rows = _rows()
    errors = ordering_errors(rows)
    flagged = {e.split(":")[0] for e in errors if "bytes not dense < lcdd:" in e}
    linear = {f"{g} {m}" for (suite, g, p, m), r in rows.items()
              if suite == "training" and p == "dense" and r["op"] == "linear"}
    assert linear and flagged == linear  # every linear group in every mode


def test_floors_grow_with_tokens_and_carrier_bytes_shrink_with_sparsity():
    for provider in masked_delta.PROVIDERS + masked_delta.DESIGN_PROVIDERS:
        for cost in (roofline._linear_costs, roofline._swiglu_costs):
            for mode in ("forward", "backward"):
                seq = [cost(provider, t, 4096, 1024)[mode] for t in (1, 16, 256, 4096, 65536)]
                assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(seq, seq[1:])), (provider, mode, seq)
    shape = {"T": 16, "N": 4096, "K": 4096, "mix": 4}
    lcdd = [roofline._carrier_costs("lcdd", {**shape, "s": s}) for s in (0.5, 0.7, 0.8, 0.9)]
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(lcdd, lcdd[1:])), lcdd
    base = {roofline._carrier_costs("base", {**shape, "s": s}) for s in (0.5, 0.9)}
    assert len(base) == 1  # the base projection does not know the carriers
    more = [roofline._carrier_costs("merged", {**shape, "s": 0.8, "mix": m}) for m in (1, 2, 4, 16)]
    assert all(a[1] < b[1] for a, b in zip(more, more[1:])), more  # one dense copy per carrier in use
    # with no carrier in the batch lcdd moves exactly what the base does (the decode-none target)
    rows = _rows()
    assert rows[("carrier", QWEN_O_DECODE, "lcdd", "forward")]["bytes"] == rows[("carrier", QWEN_O_DECODE, "base",
                                                                                   "forward")]["bytes"]


def test_every_gpu_shape_and_provider_has_a_floor():
    have = set(_rows())
    for (dev, _), (models, tokens) in masked_delta.PLANS.items():
        if dev == "cuda":
            for case in masked_delta.cases(models, tokens):
                for p in masked_delta.PROVIDERS + masked_delta.DESIGN_PROVIDERS:
                    assert {("training", case["group"], p, m) for m in ("forward", "backward", "full")} <= have
    for (dev, _), (models, projs, tokens, sparsities, mixes, _) in carrier.PLANS.items():
        if dev == "cuda":
            for case in carrier.cases(models, tokens, sparsities, mixes, projs):
                assert {("carrier", case["group"], p, "forward") for p in carrier.PROVIDERS} <= have


def test_results_file_is_current():
    assert json.loads(RESULTS.read_text())["rows"] == json.loads(json.dumps(roofline.table()))


def test_compare_reports_fraction_of_floor(tmp_path):
    row = next(r for r in roofline.table() if r["suite"] == "training")
    measured = dict(suite="training", group=row["group"], provider=row["provider"], mode=row["mode"],
                    ms_median=2 * row["floor_ms"])
    (tmp_path / "r.json").write_text(json.dumps({"rows": [measured]}))
    (out,) = roofline.compare([str(tmp_path / "r.json"), str(tmp_path / "missing.json")], str(RESULTS))
    assert abs(out["of_roofline"] - 0.5) < 1e-12


def test_compiled_providers_share_their_eager_floor():
    rows = _rows()
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
