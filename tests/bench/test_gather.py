"""The gather and eraser suites (lcdd_kernels.bench.gather / .eraser) and the loop they share
(.decoder.run_groups), on stand-in providers: what is run, what each row carries, the ratios."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lcdd_kernels.bench import decoder, eraser, gather
from lcdd_kernels.bench.results import ResultsFile
from lcdd_kernels.cli import bench as cli_bench


def test_eraser_runs_the_gather_groups_next_to_its_steps():
    assert [c["group"] for c in eraser.cases(("tiny-32k",), quick=True)] == ["step/tiny-32k", "capture/tiny-32k"]
    assert [c["group"] for c in eraser.cases(("tiny-32k",), quick=False)] == [
        "step/tiny-32k", "step/tiny-32k/kappa0", "capture/tiny-32k"]
    capture = [c for c in eraser.cases(("tiny-32k",), True) if c["group"].startswith("capture/")]
    assert gather.cases(("tiny-32k",)) == capture
    assert [t.name for t in eraser.TARGETS] == ["cpu-steps", "gpu-steps", "capture-overhead", "capture-overhead-gpu"]
    assert [t.name for t in gather.TARGETS] == ["capture-overhead", "capture-overhead-gpu"]


def test_eraser_hands_capture_groups_to_the_gather_suite(monkeypatch):
    seen = []
    monkeypatch.setattr(gather, "prepare", lambda case, provider, models: seen.append((case["group"], provider)))
    (case,) = gather.cases(("tiny-32k",))
    eraser.prepare(case, "capture", None)
    assert seen == [("capture/tiny-32k", "capture")]


def test_suites_are_found_by_the_op_name_and_by_their_first_name():
    assert cli_bench.SUITES["masked-delta"] == cli_bench.SUITES["training"] == "masked_delta"
    assert cli_bench.SUITES["gather"] == "gather" and cli_bench.SUITES["eraser"] == "eraser"


def _stand_in(case, provider, models):
    """A provider whose CPU time per call is known: ``slow`` burns twice ``fast``'s."""
    assert models == ("built", case["model"])

    def burn(ms):
        end = time.process_time() + ms / 1e3
        while time.process_time() < end:
            pass
        return torch.zeros(())

    if provider == "broken":
        raise RuntimeError("no such provider here")
    return (lambda: burn(4.0 if provider == "slow" else 2.0)), (lambda: None)


def test_run_groups_rows_ratios_and_results(monkeypatch, tmp_path):
    monkeypatch.setattr(decoder, "build_models", lambda name, device, dtype: ("built", name))
    todo = [{"group": "g/a", "model": "m", "mode": "step", "kappa": 0.5, "providers": ("fast", "slow"),
             "baseline": "fast"},
            {"group": "g/b", "model": "m", "mode": "forward", "kappa": None, "providers": ("fast", "broken"),
             "baseline": "fast"}]
    out = tmp_path / "r.json"
    rows = decoder.run_groups("suite-x", todo, _stand_in, "cpu", torch.float32, budget_s=0.0, memory=False,
                              results=ResultsFile(out), fields={"batch": 3})
    assert [(r["group"], r["provider"], r["mode"]) for r in rows] == [
        ("g/a", "fast", "step"), ("g/a", "slow", "step"), ("g/b", "fast", "forward"), ("g/b", "broken", "forward")]
    a_fast, a_slow = rows[:2]
    assert a_fast["suite"] == "suite-x" and a_fast["batch"] == 3 and a_fast["kappa"] == 0.5
    assert "providers" not in a_fast and "baseline" in a_fast  # the ratio's baseline, set by add_ratios
    assert a_fast["cost_vs_baseline"] == 1.0
    assert 1.6 < a_slow["cost_vs_baseline"] < 2.6, a_slow["cost_vs_baseline"]  # CPU time, 4 ms vs 2 ms
    assert a_slow["steps_per_s"] == pytest.approx(1e3 / a_slow["cpu_ms_min"])
    assert "steps_per_s" not in rows[2]  # forward groups have no steps
    # one failing provider marks its whole group and the run goes on
    assert all("RuntimeError: no such provider here" in r["error"] for r in rows[2:])
    assert len(json.loads(out.read_text())["rows"]) == 4


def test_models_for_refuses_unknown_models():
    class Args:
        models, quick = "tiny-32k,gpt-9", True

    with pytest.raises(ValueError, match="--models: unknown gpt-9; choose from tiny-32k, qwen3-0.6b"):
        decoder.models_for(Args, "cpu")
    Args.models = None
    assert decoder.models_for(Args, "cpu") == ("tiny-32k",)
