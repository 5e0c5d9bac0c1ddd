"""Carriers as PEFT adapters, checked against the real PEFT: PeftModel.from_pretrained(base, adapter)
gives apply_carrier's logits to fp32 rounding (LoRA and SHiRA, Llama / Mistral / Qwen2 / Qwen3),
two adapters switch with set_adapter, merge_and_unload() equals merge_carrier_ bit for bit, keys are
those PEFT itself writes, and max_rank reports what it truncates and what that costs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import lcdd_kernels as L
from lcdd_kernels.carriers.export import (CONFIG_NAME, PREFIX, REPORT_NAME, WEIGHTS_NAME,
                                          export_peft, vllm_max_lora_rank)
from lcdd_kernels.carriers.carrier import CarrierModule
from lcdd_kernels.models.patch import apply_lcdd
from lcdd_kernels.models.tiny import TINY, tiny_model

from tests.helpers.compare import assert_close
from tests.helpers.sft_pairs import sft_pair

peft = pytest.importorskip("peft", reason="PEFT is in the test extras: pip install -e '.[test]'")
from peft import PeftModel  # noqa: E402


def _carrier(family, sft_seed, dtype=torch.float32):
    """A purely sparse carrier (non_projection='base': no dense parts; see the dense tests below)."""
    handle = apply_lcdd(tiny_model(family, seed=sft_seed, dtype=dtype), tiny_model(family, seed=0, dtype=dtype),
                        seed=sft_seed, init_mean=0.0, init_std=1.0, non_projection="base")
    c = L.extract_carrier(handle, include_theta=False)
    assert not c.dense
    return c


def _without_ffn_write(c):
    """The same carrier with layer 0's ffn_write group empty: down_proj has no rows (rank 0)."""
    mods = dict(c.modules)
    path = next(p for p in mods if p.endswith("0.mlp.down_proj"))
    m = mods[path]
    mods[path] = CarrierModule(m.rows[:0], m.cols, m.delta[:0])
    return replace(c, modules=mods)


@pytest.fixture(scope="module")
def carriers():
    out = {f: [_carrier(f, 1), _carrier(f, 2)] for f in TINY}
    out["llama"][1] = _without_ffn_write(out["llama"][1])
    return out


def _base(family, dtype=torch.float32):
    return tiny_model(family, seed=0, dtype=dtype).eval()


def _ids():
    return torch.randint(4, 90, (3, 11), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _carrier_logits(family, carrier, dtype):
    model = _base(family).to(dtype)  # the float32 base upcast: the weights the carrier was made against
    c = replace(carrier, modules={p: CarrierModule(m.rows, m.cols, m.delta.to(dtype)) for p, m in
                                  carrier.modules.items()}, dtype=dtype)
    L.apply_carrier(model, c)
    return model(input_ids=_ids()).logits


@torch.no_grad()
def _logits(model):
    return model(input_ids=_ids()).logits


def _check(name, got, family, carrier):
    ref64 = _carrier_logits(family, carrier, torch.float64)
    lowp = _carrier_logits(family, carrier, torch.float32)
    assert_close(name, got, ref64, lowp)


@pytest.mark.parametrize("kind", ["lora", "shira"])
@pytest.mark.parametrize("family", list(TINY))
def test_peft_loads_the_exact_adapter(family, kind, carriers, tmp_path):
    carrier = carriers[family][0]
    report = export_peft(carrier, tmp_path / "a", kind=kind)
    assert report.exact and not report.truncated
    model = PeftModel.from_pretrained(_base(family), tmp_path / "a").eval()
    got = _logits(model)
    assert not torch.allclose(got, _logits(_base(family)), atol=1e-3), "the adapter changes nothing"
    _check(f"{family} {kind}", got, family, carrier)


def test_lora_ranks_and_scaling(carriers, tmp_path):
    carrier = carriers["llama"][1]  # layer 0 down_proj has no rows
    report = export_peft(carrier, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    for m in report.modules:
        want = max(1, min(m.rows, m.cols))
        assert cfg["rank_pattern"][m.path] == want == tensors[f"{PREFIX}{m.path}.lora_A.weight"].shape[0]
        assert cfg["alpha_pattern"][m.path] == want  # scaling alpha / r = 1
    assert cfg["r"] == cfg["lora_alpha"] == max(cfg["rank_pattern"].values())
    # both constructions occur: A selects columns (|cols| <= |rows|) and B selects rows
    shapes = {(m.rows <= m.cols) for m in report.modules if m.rows and m.cols}
    assert shapes == {True, False}
    model = PeftModel.from_pretrained(_base("llama"), tmp_path / "a").eval()
    for m in report.modules:
        layer = model.base_model.model.get_submodule(m.path)
        assert layer.r["default"] == cfg["rank_pattern"][m.path] and layer.scaling["default"] == 1.0, m.path
    _check("llama, rank-0 module", _logits(model), "llama", carrier)


@pytest.mark.parametrize("kind", ["lora", "shira"])
def test_keys_are_those_peft_writes(kind, carriers, tmp_path):
    carrier = carriers["qwen3"][0]
    report = export_peft(carrier, tmp_path / "ours", kind=kind)
    cfg = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    cls = peft.LoraConfig if kind == "lora" else peft.ShiraConfig
    fields = {k: v for k, v in cfg.items() if k not in ("peft_type", "revision") and v is not None}
    theirs = peft.get_peft_model(_base("qwen3"), cls(**fields))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_file(str(tmp_path / "ours" / WEIGHTS_NAME))
    want = load_file(str(tmp_path / "theirs" / WEIGHTS_NAME))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in want.items()}
    # SHiRA's zero padding is reported: the values written beyond the carrier's
    stored = sum(v.numel() for k, v in ours.items() if k.endswith("shira_weight"))
    assert report.padded_entries == (stored - carrier.num_parameters()["carrier"] if kind == "shira" else 0)
    assert (report.padded_entries > 0) == ("SHiRA padding" in report.summary()) == (kind == "shira")


@pytest.mark.parametrize("kind", ["lora", "shira"])
def test_two_adapters_switch_with_set_adapter(kind, carriers, tmp_path):
    c0, c1 = carriers["mistral"]
    export_peft(c0, tmp_path / "c0", kind=kind)
    export_peft(c1, tmp_path / "c1", kind=kind)
    model = PeftModel.from_pretrained(_base("mistral"), tmp_path / "c0", adapter_name="c0").eval()
    model.load_adapter(tmp_path / "c1", adapter_name="c1")
    model.set_adapter("c1")
    _check("c1", _logits(model), "mistral", c1)
    model.set_adapter("c0")
    _check("c0", _logits(model), "mistral", c0)
    with model.disable_adapter():
        assert torch.equal(_logits(model), _logits(_base("mistral")))


@pytest.mark.parametrize("kind", ["lora", "shira"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_merge_and_unload_equals_merge_carrier(family, kind, carriers, tmp_path):
    carrier = carriers[family][1]
    export_peft(carrier, tmp_path / "a", kind=kind)
    merged = PeftModel.from_pretrained(_base(family), tmp_path / "a").merge_and_unload()
    want = L.merge_carrier_(_base(family), carrier)
    got_params, want_params = dict(merged.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys()
    for name, p in want_params.items():
        # one nonzero term per entry of B·A (the other factor is one-hot): W + Δ rounded once, as merge_carrier_
        assert torch.equal(got_params[name], p), name


def test_max_rank_truncates_and_reports(carriers, tmp_path, caplog):
    carrier = carriers["qwen3"][0]
    base = _base("qwen3")
    with caplog.at_level("WARNING", logger="lcdd_kernels.carriers"):
        report = export_peft(carrier, tmp_path / "a", max_rank=8, base_model=base)
    assert not report.exact and report.truncated
    # the cut is logged: how many modules, the worst error, the switch
    assert any(f"max_rank=8 truncated {len(report.truncated)} of {len(report.modules)} modules" in r.getMessage()
               and "leave max_rank unset" in r.getMessage() for r in caplog.records)
    cut = {m.path: m for m in report.truncated}
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    for m in report.modules:
        assert m.kept == min(m.rank, 8)
        assert tensors[f"{PREFIX}{m.path}.lora_A.weight"].shape[0] == m.kept
        delta = carrier.modules[m.path].delta.double()
        if m.path in cut:
            s = torch.linalg.svdvals(delta)
            assert m.rel_error == pytest.approx(float(s[8:].norm() / s.norm()), rel=1e-9)
            assert 0 < m.rel_error < 1
        else:
            assert m.rel_error == 0.0
    # the adapter PEFT loads is the truncated carrier, and the reported logit change is its distance
    # written out here from the adapter's tensors: Δ_kept = (B·A)[rows][:, cols], fp64, then the carrier dtype
    approx = replace(carrier, theta=None, modules={
        path: CarrierModule(m.rows, m.cols, (tensors[f"{PREFIX}{path}.lora_B.weight"].double()[m.rows.long()]
                                            @ tensors[f"{PREFIX}{path}.lora_A.weight"].double()[:, m.cols.long()]
                                            ).to(carrier.dtype))
        for path, m in carrier.modules.items()})
    model = PeftModel.from_pretrained(_base("qwen3"), tmp_path / "a").eval()
    _check("truncated", _logits(model), "qwen3", approx)
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, base.config.vocab_size, (4, 32), generator=g)
    with torch.no_grad():
        exact = _base("qwen3")
        L.apply_carrier(exact, carrier)
        change = (exact(input_ids=probe).logits - model(input_ids=probe).logits).abs().max().item()
    assert report.logit_change == pytest.approx(change, rel=1e-3, abs=1e-5) and change > 1e-3
    assert "truncated" in report.summary()
    saved = json.loads((tmp_path / "a" / REPORT_NAME).read_text())
    assert saved["report"]["logit_change"] == report.logit_change


def test_refuses_to_overwrite(carriers, tmp_path):
    carrier = carriers["qwen2"][0]
    export_peft(carrier, tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_peft(carriers["qwen2"][1], tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before
    export_peft(carriers["qwen2"][1], tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() != before


def test_bad_arguments_are_refused(carriers, tmp_path):
    c = carriers["qwen2"][0]
    with pytest.raises(ValueError, match="kind"):
        export_peft(c, tmp_path / "x", kind="dora")
    with pytest.raises(ValueError, match="max_rank applies"):
        export_peft(c, tmp_path / "x", kind="shira", max_rank=4)
    with pytest.raises(ValueError, match="positive integer"):
        export_peft(c, tmp_path / "x", max_rank=0)
    with pytest.raises(ValueError, match="vLLM serves LoRA"):
        export_peft(c, tmp_path / "x", kind="shira", target="vllm")
    assert not (tmp_path / "x").exists()


def test_vllm_rank_limit():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 320, 321, 512)] == [1, 8, 8, 16, 320, 320, 512, 512]
    assert vllm_max_lora_rank(513) is None


def test_vllm_target_refuses_rank_above_512(tmp_path):
    from lcdd_kernels.models.families import Dims

    dims = Dims(num_layers=1, hidden_size=520, intermediate_size=16, num_heads=1, num_kv_heads=1, head_dim=520)
    c0 = _carrier("llama", 1)
    mods = {}
    for path, m in c0.modules.items():
        n, k = (520, 520) if "self_attn" in path else ((16, 520) if "down" not in path else (520, 16))
        if ".0." in path:
            rows, cols = torch.arange(n, dtype=torch.int32), torch.arange(k, dtype=torch.int32)
            mods[path] = CarrierModule(rows, cols, torch.zeros(n, k))
    c = L.Carrier(mods, "llama", dims, torch.float32, c0.base_fingerprint)
    with pytest.raises(ValueError, match="rank 520 but vLLM serves ranks up to 512"):
        export_peft(c, tmp_path / "v", target="vllm")
    assert not (tmp_path / "v").exists()
    report = export_peft(c, tmp_path / "v", target="vllm", max_rank=512)
    assert report.vllm_max_lora_rank == 512 and len(report.truncated) == 4


def test_cli_export(carriers, tmp_path):
    from lcdd_kernels.cli import main

    carriers["llama"][0].save(tmp_path / "c")
    assert main(["export", str(tmp_path / "c"), "--to", "peft-shira", "--out", str(tmp_path / "s")]) == 0
    assert main(["export", str(tmp_path / "c"), "--to", "peft-lora", "--out", str(tmp_path / "l"),
                 "--max-rank", "8", "--tiny", "llama"]) == 0
    report = json.loads((tmp_path / "l" / REPORT_NAME).read_text())["report"]
    assert report["max_rank"] == 8 and report["logit_change"] is not None
    assert main(["export", str(tmp_path / "c"), "--to", "peft-lora", "--out", str(tmp_path / "l")]) == 2
    model = PeftModel.from_pretrained(_base("llama"), tmp_path / "s").eval()
    _check("cli shira", _logits(model), "llama", carriers["llama"][0])


# ------------------------------------------------------------------ dense parts (carrier format v2)


def _dense_carrier(family):
    """A carrier with dense parts: the SFT model moved every norm and projection bias (sft_pair)."""
    sft, base = sft_pair(family, dtype=torch.float32)
    theta = torch.randn(L.apply_lcdd(tiny_model(family), tiny_model(family), non_projection="base").dims.num_masks,
                        generator=torch.Generator().manual_seed(3))
    c = L.extract_carrier(apply_lcdd(sft, base, theta=theta), include_theta=False)
    assert c.dense
    return c


def _pair_base(family, dtype=torch.float32):
    return sft_pair(family, dtype=torch.float32)[1].to(dtype).eval()


def _check_dense(name, got, family, carrier):
    refs = []
    for dtype in (torch.float64, torch.float32):
        model = _pair_base(family, dtype)
        c = replace(carrier, modules={p: CarrierModule(m.rows, m.cols, m.delta.to(dtype)) for p, m in
                                      carrier.modules.items()},
                    dense={k: v.to(dtype) for k, v in carrier.dense.items()}, dtype=dtype)
        L.apply_carrier(model, c)
        with torch.no_grad():
            refs.append(model(input_ids=_ids()).logits)
    assert_close(name, got, refs[0], refs[1])


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_dense_parts_go_into_the_lora_adapter(family, tmp_path):
    carrier = _dense_carrier(family)
    report = export_peft(carrier, tmp_path / "a", base_model=_pair_base(family))
    assert report.dense_exported == sorted(carrier.dense) and not report.dense_dropped and report.exact
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    biases = [n for n in carrier.dense if n.endswith("_proj.bias")]
    assert bool(cfg.get("lora_bias")) == bool(biases) == (family == "qwen2")
    assert cfg["modules_to_save"] == sorted({n.rsplit(".", 1)[0] for n in carrier.dense if n not in biases})
    model = PeftModel.from_pretrained(_pair_base(family), tmp_path / "a").eval()
    got = _logits(model)
    _check_dense(f"{family} lora + dense", got, family, carrier)
    # without its dense parts the adapter would be another model: the check can fail
    sparse = replace(carrier, dense={})
    with pytest.raises(AssertionError):
        _check_dense("sparse only", got, family, sparse)
    # PEFT's own save of that config has the same keys and shapes
    fields = {k: v for k, v in cfg.items() if k not in ("peft_type", "revision") and v is not None}
    theirs = peft.get_peft_model(_pair_base(family), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    want = load_file(str(tmp_path / "theirs" / WEIGHTS_NAME))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in want.items()}


def test_dense_norms_go_into_a_shira_adapter(tmp_path):
    carrier = _dense_carrier("qwen3")  # norms only (Qwen3 has no projection biases)
    report = export_peft(carrier, tmp_path / "s", kind="shira")
    assert report.dense_exported == sorted(carrier.dense) and report.exact
    model = PeftModel.from_pretrained(_pair_base("qwen3"), tmp_path / "s").eval()
    _check_dense("qwen3 shira + norms", _logits(model), "qwen3", carrier)


def test_dense_parts_refused_where_they_cannot_go(tmp_path, caplog):
    carrier = _dense_carrier("qwen2")
    with pytest.raises(ValueError, match=r"vLLM cannot load.*drop_dense=True \(CLI: --drop-dense\)"):
        export_peft(carrier, tmp_path / "v", target="vllm")
    with pytest.raises(ValueError, match=r"SHiRA has no bias.*drop_dense"):
        export_peft(carrier, tmp_path / "s", kind="shira")
    with pytest.raises(ValueError, match=r"needs the base model.*base_model="):
        export_peft(carrier, tmp_path / "l")
    assert not any((tmp_path / d).exists() for d in ("v", "s", "l"))
    with caplog.at_level("WARNING", logger="lcdd_kernels.carriers"):
        report = export_peft(carrier, tmp_path / "v", target="vllm", drop_dense=True)
    assert report.dense_dropped == sorted(carrier.dense) and not report.exact and "DROPPED" in report.summary()
    assert any(f"drop_dense=True left {len(carrier.dense)} dense parts" in r.getMessage() for r in caplog.records)
    cfg = json.loads((tmp_path / "v" / CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] is None and not cfg.get("lora_bias")
    # what was dropped: the adapter is the sparse part alone
    model = PeftModel.from_pretrained(_pair_base("qwen2"), tmp_path / "v").eval()
    _check_dense("dropped dense", _logits(model), "qwen2", replace(carrier, dense={}))
