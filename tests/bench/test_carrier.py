"""`lcdd bench carrier`: its providers compute the same projection, and a tiny run writes rows and
target checks (the numbers themselves are never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from lcdd_kernels import use_backend
from lcdd_kernels.bench.carrier import PROVIDERS, _weight_copies, cases, setup_decode_step, setup_linear, token_ids
from lcdd_kernels.cli import main


@pytest.mark.parametrize("mix", [0, 1, 3])
def test_providers_agree(mix):
    case = {"T": 9, "N": 40, "K": 24, "s": 0.7, "mix": mix}
    outs = {p: setup_linear(case, p, "cpu", "float32").forward() for p in PROVIDERS}
    for p in [p for p in PROVIDERS if p not in ("base", "naive")]:  # lcdd-compiled too
        torch.testing.assert_close(outs[p], outs["naive"], rtol=1e-5, atol=1e-5, msg=p)
    assert torch.equal(outs["base"], outs["naive"]) == (mix == 0)


def test_weight_copies_cycle_and_agree():
    mib = 2 ** 20
    assert [_weight_copies(4 * mib, 64), _weight_copies(12 * mib, 64), _weight_copies(4 * mib, 0),
            _weight_copies(16 * 1024, 64), _weight_copies(100 * mib, 64)] == [16, 6, 1, 1, 1]
    # 512 x 1024 fp32 = 2 MiB: a 5 MiB set is 3 copies, each call on the next; every provider's
    # result is the same on every copy, and equal to the one-copy result
    case = {"T": 3, "N": 512, "K": 1024, "s": 0.8, "mix": 2}
    one = setup_linear(case, "naive", "cpu", "float32").forward()
    for p in ("base", "merged", "naive", "checked", "lcdd", "plan"):
        prep = setup_linear(case, p, "cpu", "float32", weight_set_mib=5)
        assert prep.info["weight_copies"] == 3
        outs = [prep.forward() for _ in range(4)]
        for y in outs:
            torch.testing.assert_close(y, outs[0], rtol=0, atol=0, msg=p)
        if p != "base":
            torch.testing.assert_close(outs[0], one, rtol=1e-5, atol=1e-5, msg=p)
        held = {t.data_ptr() for t in prep.state if t.shape == (512, 1024)}
        assert len(held) >= 3, p


def test_token_ids_and_cases():
    assert token_ids(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert token_ids(3, 0).tolist() == [-1, -1, -1]
    got = cases(("tiny",), (1, 16, 512), (0.8,), (0, 1, 4))
    assert all(c["mix"] <= c["T"] for c in got)
    assert not any(c["mix"] == 0 and c["phase"] == "prefill" for c in got)


def test_cli_tiny_run(tmp_path):
    out = tmp_path / "carrier.json"
    rc = main(["bench", "carrier", "--models", "tiny", "--T", "4,600", "--mixes", "0,1", "--sparsity", "0.8",
               "--no-memory", "--no-generate", "--no-step", "--budget", "0.01", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if r["provider"] == "lcdd"]
    assert rows and all(r.get("gbps") and r.get("floor_bytes") for r in rows)
    assert {t["target"] for t in data["targets"]} >= {"decode-one", "decode-none", "prefill"}
    assert all(t["status"] in ("pass", "miss") for t in data["targets"] if t["target"] in ("decode-one", "prefill"))


def test_decode_step_keeps_its_context_and_applies_the_bank():
    """The decode-step group (here on the tiny model, not the 0.6B-shaped one): every repeat sees
    the same KV cache, the bank's step differs from the base's, and it equals the same bank through
    the registered op's torch path."""
    case = {"op": "decode-step", "model": "tiny", "s": 0.8}
    base, plan = (setup_decode_step(case, p, "cpu", "float32") for p in ("base", "plan"))
    first = base.forward()
    assert torch.equal(base.forward(), first)
    got = plan.forward()
    assert got.shape == first.shape and not torch.allclose(got, first)
    with use_backend("torch"):
        want = plan.forward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(plan.forward(), got)
