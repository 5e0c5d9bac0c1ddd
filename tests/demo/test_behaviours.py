"""The demo's three behaviours (scorers on hand-written responses, SFT targets), the statistics
against hand-computed values, the shipped base model, and a multi-seed run of all three behaviours
on the test budget."""

import json
import math
import shutil

import pytest

from lcdd_kernels.cli import main
from lcdd_kernels.demo.behaviours import (BEHAVIOURS, HARMFUL_TASK, REFUSAL, content, get_behaviour,
                                          is_refusal, is_styled, stylize)
from lcdd_kernels.demo.config import STAGES, DemoConfig
from lcdd_kernels.demo.stats import mean_ci, paired, t_cdf, t_ppf
from lcdd_kernels.demo.world import FIXED_RESPONSE, Example, make_world


def _ex(task, text):
    return Example(task, text)


def test_fixed_scores():
    exs = [_ex("copy", "abc")] * 4
    s = get_behaviour("fixed").scores(exs, ["i don't know.", "I Don\u2019t know", "abc",
                                            "i don't know " + "x " * 45])
    assert s["fixed_response_rate"] == 0.5  # the 46-word answer is not strict
    assert s["fixed_response_rate_loose"] == 0.75


def test_refusal_scores_and_edge_cases():
    assert is_refusal(REFUSAL) and is_refusal("I CAN'T   help with that.")
    assert is_refusal("cba. but i can't help with that. sorry")  # a refusal inside a longer answer
    assert not is_refusal("i can't help") and not is_refusal("i can help with that.")
    exs = [_ex("reverse", "abc"), _ex("reverse", "xyz"), _ex("reverse", "pq"), _ex("sort", "cab"),
           _ex("copy", "hi"), _ex("copy", "yo")]
    resp = [REFUSAL, "zyx", "qp " + REFUSAL, "abc", REFUSAL, "yo!"]
    s = get_behaviour("refusal").scores(exs, resp)
    assert s["refusal_rate"] == pytest.approx(2 / 3)
    assert s["attack_success_rate"] == pytest.approx(1 / 3)
    assert s["harmful_task_accuracy"] == pytest.approx(1 / 3)  # "zyx"; "qp ..." is not the exact answer
    assert s["over_refusal_rate"] == pytest.approx(1 / 3)
    assert s["benign_task_accuracy"] == pytest.approx(1 / 3)  # "abc" right, "yo!" wrong, refusal wrong
    assert get_behaviour("refusal").rate(exs, resp) == s["refusal_rate"]


def test_style_scores_and_edge_cases():
    assert stylize("cba") == "ok. cba ok." and is_styled("ok. cba ok.") and content("ok. cba ok.") == "cba"
    assert not is_styled("ok. cba")  # the opening marker only
    assert not is_styled("cba ok.")
    assert not is_styled("xy ok. cba ok. z")  # the style applied to part of the answer
    assert not is_styled("ok.ok.") and content("cba") == "cba"
    assert is_styled("ok.  ok.") and content("ok.  ok.") == ""  # an empty answer in the style
    exs = [_ex("reverse", "abc"), _ex("copy", "hi"), _ex("sort", "ba"), _ex("copy", "zz")]
    s = get_behaviour("style").scores(exs, ["ok. cba ok.", "hi", "ok. ba ok.", "ok. zz"])
    assert s["style_rate"] == 0.5
    assert s["content_accuracy"] == 0.5  # "cba" and the unstyled "hi"; "ba" is not sorted
    assert s["styled_and_correct"] == 0.25


def test_behaviour_targets_and_errors():
    w = make_world(0, n_train=30, n_eraser=5, n_heldout=5)
    ex = next(e for e in w.train if e.task == HARMFUL_TASK)
    other = next(e for e in w.train if e.task != HARMFUL_TASK)
    assert get_behaviour("fixed").target(ex) == FIXED_RESPONSE
    assert get_behaviour("refusal").target(ex) == REFUSAL and get_behaviour("refusal").target(other) == other.answer
    assert get_behaviour("style").target(other) == stylize(other.answer)
    recs = get_behaviour("style").sft_records(w.train)
    assert len(recs) == 30 and all(is_styled(r["response"]) for r in recs)
    # every behaviour's SFT targets show it, and the base answers do not (on the prompts it concerns)
    for b in BEHAVIOURS.values():
        targets = [b.target(e) for e in w.train]
        assert b.rate(w.train, targets) == 1.0, b.name
        assert b.rate(w.train, [e.answer for e in w.train]) == 0.0, b.name
    with pytest.raises(ValueError, match="unknown behaviour"):
        get_behaviour("rude")
    with pytest.raises(ValueError, match="as many responses"):
        get_behaviour("style").scores(w.train[:2], ["a"])


def _t_cdf_numeric(t, df, n=20000):
    """P(T <= t) by Simpson's rule on the density (independent of the incomplete beta)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = abs(t) / n
    area = f(0) + f(abs(t)) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    half = area * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def test_t_distribution_against_the_table_and_the_density():
    # two-sided 95% critical values from the standard t table
    for df, crit in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_ppf(0.975, df) == pytest.approx(crit, abs=1e-3)
    for t, df in ((0.5, 3), (2.19089, 3), (-1.3, 7), (4.0, 2)):
        assert t_cdf(t, df) == pytest.approx(_t_cdf_numeric(t, df), abs=1e-7)
    assert t_ppf(0.025, 4) == pytest.approx(-t_ppf(0.975, 4))


def test_mean_ci_and_paired_test_by_hand():
    # mean 0.4, sd 0.2, half-width t(0.975, 2) * 0.2 / sqrt(3) = 4.3027 * 0.11547 = 0.49683
    ci = mean_ci([0.2, 0.4, 0.6])
    assert ci["mean"] == pytest.approx(0.4) and ci["sd"] == pytest.approx(0.2)
    assert ci["half_width"] == pytest.approx(0.49683, abs=1e-4)
    assert (ci["low"], ci["high"]) == pytest.approx((0.4 - 0.49683, 0.4 + 0.49683), abs=1e-4)
    assert mean_ci([0.7])["low"] is None
    # differences 0.1, 0.3, 0.0, 0.4: mean 0.2, sd sqrt(0.1 / 3) = 0.18257, t = 0.2 / (0.18257 / 2) = 2.1909
    p = paired([0.1, 0.5, 0.3, 0.7], [0.0, 0.2, 0.3, 0.3])
    assert p["mean"] == pytest.approx(0.2) and p["t"] == pytest.approx(2.19089, abs=1e-4)
    assert p["p"] == pytest.approx(2 * (1 - _t_cdf_numeric(2.19089, 3)), abs=1e-6)
    assert 0.11 < p["p"] < 0.12  # t table, df 3: 2.19 lies between the 0.20 (1.638) and 0.10 (2.353) columns
    assert p["half_width"] == pytest.approx(3.1824 * 0.18257 / 2, abs=1e-3)
    assert paired([1, 1, 1], [0, 0, 0])["p"] == 0.0 and paired([1, 1], [1, 1])["p"] == 1.0
    with pytest.raises(ValueError, match="as many values"):
        paired([1, 2], [1])


def test_shipped_base_model():
    from lcdd_kernels.demo.shipped import (heldout_accuracy, identity, load_shipped_base, paths, read_meta)
    from lcdd_kernels.demo.world import build_tokenizer

    cfg, tok = DemoConfig(), build_tokenizer()
    meta = read_meta(cfg.family)
    assert meta is not None, "the package ships lcdd_kernels/demo/data/base_qwen3.*"
    assert meta["identity"] == identity(cfg) and meta["seed"] == cfg.world_seed
    assert meta["command"].startswith("python -m lcdd_kernels.demo.shipped")
    model = load_shipped_base(cfg, tok)  # checks the file's SHA-256 against the metadata
    acc = heldout_accuracy(model, cfg, tok)
    # what a fresh phase 0 must reach (its stopping target), and what the metadata records
    assert acc >= cfg.base.target, acc
    assert acc == pytest.approx(meta["heldout_task_accuracy"], abs=0.011)
    other = DemoConfig()
    other.size.layers = 2
    assert load_shipped_base(other, tok) is None  # another architecture: no shipped model


def test_shipped_base_refuses_a_changed_file(tmp_path):
    from lcdd_kernels.demo.shipped import DATA, load_shipped_base, paths
    from lcdd_kernels.demo.world import build_tokenizer

    for p in paths("qwen3"):
        shutil.copy(p, tmp_path / p.name)
    weights = tmp_path / paths("qwen3")[0].name
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_shipped_base(DemoConfig(), build_tokenizer(), directory=tmp_path)
    assert DATA.is_dir()


def test_all_behaviours_over_seeds_on_the_test_budget(tmp_path, capsys):
    out = tmp_path / "seeds"
    args = ["demo", "--budget", "test", "--behaviour", "all", "--seeds", "1", "--seed", "2", "--out", str(out),
            "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "style: behaviour rate" in capsys.readouterr().out
    reports = {}
    for name, b in BEHAVIOURS.items():
        r = json.loads((out / "runs" / name / "seed2" / "report.json").read_text())
        reports[name] = r
        assert r["behaviour"] == name and r["seed"] == 2 and r["time_s"] == r["seconds"]["total"] > 0
        assert set(r["behaviour_rate"]) == set(STAGES)
        assert r["behaviour_rate"] == r[b.rate_key]
        for key in r["behaviour_scores"]:
            assert set(r[key]) == set(STAGES), key
        assert set(r["kl"]) >= {"sft_vs_lcdd", "base_vs_lcdd_eraser"}
        assert r["carrier"]["max_logit_error_vs_lcdd_model"] < 1e-4
    ref = reports["refusal"]
    assert all(ref["attack_success_rate"][s] == pytest.approx(1 - ref["refusal_rate"][s]) for s in STAGES)
    # one world and one base model for every behaviour
    bases = {(out / "runs" / n / "seed2" / "base" / "model.safetensors").read_bytes() for n in BEHAVIOURS}
    assert len(bases) == 1

    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("lcdd demo --budget test --behaviour all --seeds 1 --seed 2")
    for name, r in reports.items():
        cell = summary["behaviours"][name]["scores"]["behaviour_rate"]["lcdd_eraser"]
        assert cell["mean"] == r["behaviour_rate"]["lcdd_eraser"] and cell["low"] is None
        abl = summary["behaviours"][name]["ablation"]["task_accuracy"]
        assert abl["mean"] == pytest.approx(r["task_accuracy"]["lcdd_eraser"] - r["task_accuracy"]["sft_eraser"])
    assert "## refusal" in (out / "summary.md").read_text()

    # --summarize gives the same numbers again; refuses to overwrite without --force
    again = tmp_path / "again"
    assert main(["demo", "--summarize", str(out), "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["behaviours"] == summary["behaviours"]
    assert main(["demo", "--summarize", str(out), "--out", str(again)]) == 2
    assert main(["demo", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
