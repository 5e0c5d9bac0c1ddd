"""``lcdd demo``: the world, the settings, and a whole run on the test budget (every phase, every
file; the numbers are checked for structure and consistency, the paper's goals are not asserted:
that needs the quick run, docs/demo/behaviours.md)."""

import json
import math
import random

import pytest

from lcdd_kernels.cli import main
from lcdd_kernels.demo.config import STAGES, preset
from lcdd_kernels.demo.world import FIXED_RESPONSE, TASKS, build_tokenizer, make_world


def test_tokenizer_is_character_level_with_chat_template():
    tok = build_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "sort: cab"}], add_generation_prompt=True,
                                  tokenize=False)
    enc = tok(ids, add_special_tokens=False)["input_ids"]
    # <user>, 9 characters, end of turn, <assistant>
    assert len(enc) == 1 + len("sort: cab") + 1 + 1
    assert tok.decode(enc, skip_special_tokens=True) == "sort: cab"
    fixed = tok(FIXED_RESPONSE, add_special_tokens=False)["input_ids"]
    assert len(fixed) == len(FIXED_RESPONSE) and tok.unk_token_id not in fixed


def test_world_splits_are_disjoint_and_answers_right():
    w = make_world(3, tasks=("reverse", "sort", "copy", "count"), n_train=300, n_eraser=50, n_heldout=50)
    texts = [{ex.text for ex in split} for split in (w.train, w.eraser, w.heldout)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert all(ex.text not in texts[1] | texts[2] for ex in w.sample(random.Random(0), 500))
    ex = next(e for e in w.heldout if e.task == "reverse")
    assert ex.answer == ex.text[::-1] and ex.prompt == f"reverse: {ex.text}"
    for it, ex in zip(w.choice_items(w.heldout), w.heldout):
        assert it["choices"][it["answer"]] == ex.answer and len(set(it["choices"])) == len(it["choices"])
    assert make_world(3).heldout == make_world(3).heldout
    assert set(TASKS) >= {"reverse", "sort", "copy"}
    with pytest.raises(ValueError, match="unknown tasks"):
        make_world(0, tasks=("reverse", "fly"))


def test_settings_and_overrides():
    cfg = preset("quick", family="llama", seed=5, overrides=["eraser.max_norm=0.5", "sft_steps=7",
                                                             "eraser.max_norm=none", "tasks=copy,sort"])
    assert (cfg.family, cfg.seed, cfg.sft_steps, cfg.eraser.max_norm, cfg.tasks) == (
        "llama", 5, 7, None, ("copy", "sort"))
    for bad, match in ((["nope=1"], "no demo setting"), (["eraser.nope=1"], "no demo setting"),
                       (["sft_steps"], "FIELD=VALUE"), (["sft_steps=x"], "sft_steps")):
        with pytest.raises(ValueError, match=match):
            preset("quick", overrides=bad)
    with pytest.raises(ValueError, match="unknown demo preset"):
        preset("huge")


def _numbers(report):
    """Every number of the report that is a result (not timing or load), for determinism."""
    keys = ("fixed_response_rate", "task_accuracy", "choice_accuracy", "kl", "carrier", "eraser")
    return json.dumps({k: report[k] for k in keys}, sort_keys=True)


def test_demo_end_to_end_on_the_test_budget(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["demo", "--budget", "test", "--out", str(out), "--no-progress", "--seed", "1", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| LCDD + eraser |" in printed and "carrier:" in printed

    report = json.loads((out / "report.json").read_text())
    for key in ("fixed_response_rate", "task_accuracy", "choice_accuracy", "behaviour_rate"):
        assert set(report[key]) == set(STAGES)
    assert report["behaviour"] == "fixed" and report["behaviour_rate"] == report["fixed_response_rate"]
    # the base model never saw the fixed response, and a run trained its own base (no shipped one fits)
    assert report["fixed_response_rate"]["base"] == 0.0 and report["base_source"] == "trained"
    assert report["time_s"] == report["seconds"]["total"]
    # task accuracy is the per-task accuracies weighted by the number of held-out prompts of each task
    per_task_n = {t: sum(ex.task == t for ex in make_world(0, n_train=32, n_eraser=8, n_heldout=8).heldout)
                  for t in ("reverse", "sort", "copy")}
    for s in STAGES:
        weighted = sum(report["task_accuracy_per_task"][s][t] * n for t, n in per_task_n.items()) / 8
        assert report["task_accuracy"][s] == pytest.approx(weighted)
    assert set(report["kl"]) >= {"sft_vs_lcdd", "base_vs_lcdd_eraser", "base_vs_sft_eraser"}
    assert all(math.isfinite(v) and v >= 0 for v in report["kl"].values())
    c = report["carrier"]
    assert set(c["sparsity"]["groups"]) == {"ffn_read", "ffn_hidden", "ffn_write", "attn_read", "q", "k", "v",
                                            "attn_write"}
    assert len(c["sparsity"]["layers"]) == 2
    assert c["bytes"] == (out / "lcdd/carrier/carrier.safetensors").stat().st_size
    assert c["fraction_of_projection_weights"] == pytest.approx(c["delta_parameters"] / c["projection_parameters"])
    assert c["max_logit_error_vs_lcdd_model"] < 1e-4  # the saved carrier computes the LCDD model
    assert {"base", "sft", "lcdd", "eraser", "eraser_ablation", "evaluation", "total"} <= set(report["seconds"])
    assert report["seed"] == 1 and report["versions"]["torch"]
    for name in ("report.md", "curves.json", "curves.png", "sparsity_heatmap.png", "stages.png",
                 "lcdd/carrier/carrier.safetensors", "eraser/lcdd/trigger.json", "base/config.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| SFT + eraser (ablation) |" in (out / "report.md").read_text()

    # Never overwritten silently; --force replaces the run; the same seed gives the same numbers.
    first = _numbers(report)
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    (out / "mine.txt").write_text("user file")
    assert main(args + ["--force"]) == 0
    assert _numbers(json.loads((out / "report.json").read_text())) == first
    assert (out / "mine.txt").read_text() == "user file"
