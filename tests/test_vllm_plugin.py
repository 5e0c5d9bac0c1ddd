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
