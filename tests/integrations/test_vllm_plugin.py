"""The vLLM plugin's parts that run without vLLM: importing the package never imports vLLM, the
version gate, and recognising / refusing carrier directories given as LoRA adapter paths."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lcdd_kernels.integrations import vllm as plugin
from lcdd_kernels.integrations.vllm import carrier_dir


def test_importing_the_package_and_the_plugin_never_imports_vllm():
    code = ("import sys, lcdd_kernels, lcdd_kernels.integrations.vllm as p, lcdd_kernels.integrations.vllm.carrier_dir; "
            "lcdd_kernels.CarrierBank; assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if 'vllm' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version_gate():
    assert plugin.supported("0.32.0") and plugin.supported("0.32.0+cpu")
    assert not plugin.supported("0.32.1") and not plugin.supported("0.31.0") and not plugin.supported("0.3.2")


def test_register_on_another_vllm_logs_one_line_and_registers_nothing(monkeypatch, caplog):
    fake = type(sys)("vllm")
    fake.__version__ = "0.99.0"
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(plugin, "_registered", False)
    with caplog.at_level("WARNING", logger="lcdd_kernels.vllm"):
        plugin.register()
    lines = [r.getMessage() for r in caplog.records if r.name == "lcdd_kernels.vllm"]
    assert len(lines) == 1 and "0.99.0" in lines[0] and "0.32.0" in lines[0], lines
    assert not plugin._registered
    assert "lcdd_kernels.integrations.vllm.patches" not in sys.modules


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from lcdd_kernels.serving import vllm_env

    root = tmp_path_factory.mktemp("plugin")
    model, tok = vllm_env.served_model(0)
    vllm_env.save_served_model(model, tok, root / "model")
    carrier = vllm_env.served_carrier(1)
    carrier.save(root / "c1")
    return root, model, carrier


def test_a_carrier_dir_is_recognised_and_a_peft_dir_is_not(served, tmp_path):
    root, _, _ = served
    assert carrier_dir.is_carrier_dir(root / "c1")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert not carrier_dir.is_carrier_dir(tmp_path) and not carrier_dir.is_carrier_dir(tmp_path / "nothing")


def test_the_checkpoint_fingerprint_is_the_loaded_models(served):
    import lcdd_kernels as L

    root, model, carrier = served
    assert carrier_dir.checkpoint_fingerprint(str(root / "model")) == L.base_fingerprint(model) == carrier.base_fingerprint
    got = carrier_dir.load_for_model(root / "c1", str(root / "model"), model.config)
    assert set(got.modules) == set(carrier.modules)
    for p, m in carrier.modules.items():
        assert torch.equal(got.modules[p].delta, m.delta) and torch.equal(got.modules[p].rows, m.rows)


def test_required_signature_is_checked_at_load(served, tmp_path, monkeypatch):
    pytest.importorskip("model_signing", reason="signing needs the `sign` extra (model-signing)")
    import shutil

    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    import lcdd_kernels as L

    root, model, _ = served
    keys = {}
    for name in ("ours", "theirs"):
        key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / f"{name}.pem").write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                                                 s.NoEncryption()))
        (tmp_path / f"{name}.pub").write_bytes(key.public_key().public_bytes(s.Encoding.PEM,
                                                                              s.PublicFormat.SubjectPublicKeyInfo))
        keys[name] = tmp_path / f"{name}.pub"
    signed = tmp_path / "signed"
    shutil.copytree(root / "c1", signed)
    L.sign_carrier(signed, tmp_path / "ours.pem")
    monkeypatch.setenv(carrier_dir.VERIFY_ENV, str(keys["ours"]))
    carrier_dir.load_for_model(signed, str(root / "model"), model.config)
    with pytest.raises(carrier_dir.CarrierRefused, match="not signed"):
        carrier_dir.load_for_model(root / "c1", str(root / "model"), model.config)
    monkeypatch.setenv(carrier_dir.VERIFY_ENV, str(keys["theirs"]))
    with pytest.raises(carrier_dir.CarrierRefused, match="signature"):
        carrier_dir.load_for_model(signed, str(root / "model"), model.config)


def test_refusals_name_the_problem(served, tmp_path):
    from safetensors.torch import load_file, save_file

    from lcdd_kernels.serving import vllm_env

    root, model, carrier = served
    other, _ = vllm_env.served_model(5)
    vllm_env.save_served_model(other, _, tmp_path / "other")
    with pytest.raises(carrier_dir.CarrierRefused, match="base model mismatch"):
        carrier_dir.load_for_model(root / "c1", str(tmp_path / "other"), other.config)
    damaged = tmp_path / "damaged"
    carrier.save(damaged)
    t = load_file(damaged / "carrier.safetensors")
    key = next(k for k in t if k.endswith("carrier_delta") and t[k].numel())
    t[key] = t[key].clone()
    t[key].view(-1)[0] += 1.0
    save_file(t, damaged / "carrier.safetensors")
    with pytest.raises(carrier_dir.CarrierRefused, match="SHA-256"):
        carrier_dir.load_for_model(damaged, str(root / "model"), model.config)
    cfg = model.config.to_dict()
    cfg["intermediate_size"] = 512
    with pytest.raises(carrier_dir.CarrierRefused, match="dims"):
        carrier_dir.load_for_model(root / "c1", str(root / "model"), type(model.config).from_dict(cfg))
    dense = tmp_path / "dense"
    c = type(carrier)(carrier.modules, carrier.family, carrier.dims, carrier.dtype, carrier.base_fingerprint,
                      dense={"model.norm.weight": torch.ones(carrier.dims.hidden_size)})
    c.save(dense)
    with pytest.raises(carrier_dir.CarrierRefused, match=r"dense parts \(model\.norm\.weight\).*non-projection base"):
        carrier_dir.load_for_model(dense, str(root / "model"), model.config)


class _FakeLoRALayer:
    """What :func:`slots.fuse` reads of a vLLM LoRA linear layer."""

    def __init__(self, slices, k, tp_size=1):
        self.output_slices, self.input_size, self.tp_size = tuple(slices), k, tp_size
        self.device = torch.device("cpu")


def _vllm_layers(dims, tp_size=1):
    h, i = dims.hidden_size, dims.intermediate_size
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    out = {}
    for layer in range(dims.num_layers):
        p = f"model.layers.{layer}."
        out[p + "self_attn.qkv_proj"] = _FakeLoRALayer((q, kv, kv), h, tp_size)
        out[p + "self_attn.o_proj"] = _FakeLoRALayer((h,), q, tp_size)
        out[p + "mlp.gate_up_proj"] = _FakeLoRALayer((i, i), h, tp_size)
        out[p + "mlp.down_proj"] = _FakeLoRALayer((h,), i, tp_size)
    return out


PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_fused_entries_are_the_carrier_exactly_at_its_bytes(served):
    """Each fused entry applied to x equals its parts' carriers side by side, and the slot holds
    the carrier's own bytes (no dense LoRA, nothing dropped)."""
    from lcdd_kernels.integrations.vllm.slots import fuse
    from lcdd_kernels.ops.carrier import carrier_linear_ref

    _, _, carrier = served
    layers = _vllm_layers(carrier.dims)
    w = fuse(carrier, layers, PACKED, torch.float64, "test")
    assert set(w.entries) == set(layers)
    es, ms = list(w.entries.values()), list(carrier.modules.values())
    assert sum(e.delta.numel() for e in es) == sum(m.delta.numel() for m in ms)  # every Δ entry, no more
    assert sum(e.rows.numel() for e in es) == sum(m.rows.numel() for m in ms)
    # in the carrier's dtype the slot holds at most the carrier's bytes (fused parts share their columns)
    w32 = fuse(carrier, layers, PACKED, carrier.dtype, "test").nbytes()
    assert sum(m.delta.numel() * m.delta.element_size() for m in ms) < w32 <= carrier.nbytes()["sparse"]
    gen = torch.Generator().manual_seed(0)
    for name, e in w.entries.items():
        prefix, _, last = name.rpartition(".")
        parts = PACKED.get(last, [last])
        n, k = sum(layers[name].output_slices), layers[name].input_size
        x = torch.randn(5, k, generator=gen, dtype=torch.float64)
        zero = torch.zeros(n, k, dtype=torch.float64)
        got = carrier_linear_ref(x, zero, e.delta, e.rows.long(), e.cols.long())
        want = []
        for p, size in zip(parts, layers[name].output_slices):
            m = carrier.modules[f"{prefix}.{p}"]
            want.append(carrier_linear_ref(x, torch.zeros(size, k, dtype=torch.float64), m.delta.double(),
                                           m.rows.long(), m.cols.long()))
        torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=0, atol=1e-12)  # float64: GEMM blocking only


def test_fuse_refuses_unknown_splits_sharded_and_missing_layers(served):
    from lcdd_kernels.integrations.vllm.slots import fuse

    _, _, carrier = served
    # a layer split over ranks in a way the plugin does not know (tests/integrations/test_vllm_shards.py: the known ones)
    with pytest.raises(ValueError, match="_FakeLoRALayer split over 2 tensor-parallel ranks"):
        fuse(carrier, _vllm_layers(carrier.dims, tp_size=2), PACKED, torch.float32, "c")
    layers = _vllm_layers(carrier.dims)
    sharded = type("RowParallelLinearWithShardedLoRA", (_FakeLoRALayer,), {})
    layers["model.layers.0.mlp.down_proj"].__class__ = sharded
    with pytest.raises(ValueError, match="fully-sharded-loras"):
        fuse(carrier, layers, PACKED, torch.float32, "c")
    layers = _vllm_layers(carrier.dims)
    del layers["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no LoRA layer for 1 of the carrier's projections.*down_proj"):
        fuse(carrier, layers, PACKED, torch.float32, "c")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_add_carriers_matches_the_bank_reference_per_slot(backend):
    """The plugin's one kernel call: per token its slot's carrier, −1 and empty slots nothing."""
    import lcdd_kernels as L
    from lcdd_kernels import _backend

    if backend == "cpp" and not _backend.native_available():
        pytest.skip("lcdd_kernels._C is not built")
    from lcdd_kernels.integrations.vllm.carrier_op import add_carriers_
    from lcdd_kernels.ops.carrier import CarrierTable, bank_linear_ref
    from lcdd_kernels.ops.carrier_plan import CarrierPlan

    gen = torch.Generator().manual_seed(1)
    n, k = 48, 40
    items = []
    for r, c in ((7, 9), (0, 0), (12, 3)):
        rows = torch.randperm(n, generator=gen)[:r].sort().values
        cols = torch.randperm(k, generator=gen)[:c].sort().values
        items.append((torch.randn(r, c, generator=gen), rows, cols))
    items.append(None)  # a slot holding a PEFT LoRA or nothing
    table = CarrierTable(n, k, [None if it is None else CarrierTable.entry(*it, n, slots=False) for it in items],
                         torch.device("cpu"))
    plan = CarrierPlan.from_table(table, torch.float32)
    x = torch.randn(12, k, generator=gen)
    ids = torch.tensor([0, -1, 2, 3, 1, 0, -1, 2, 2, 3, 0, 99], dtype=torch.int32)  # 99: no slot, adds nothing
    base = torch.randn(n, k, generator=gen)
    out = x @ base.t()
    with L.use_backend(backend):
        add_carriers_(out, x, plan, ids)
    want = bank_linear_ref(x, base, [None if it is None else (it[0], it[1].long(), it[2].long()) for it in items],
                           ids.long().masked_fill(ids >= len(items), -1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
