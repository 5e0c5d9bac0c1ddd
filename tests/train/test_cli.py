"""The training and carrier commands end to end on a tiny model: train-sft -> train-lcdd -> extract ->
inspect, plus the errors a user meets."""

from __future__ import annotations

import json

import pytest
import torch

from lcdd_kernels.cli import main


def test_tiny_pipeline(tmp_path, capsys):
    sft, run = tmp_path / "sft", tmp_path / "lcdd"
    assert main(["train-sft", "--tiny", "qwen3", "--out", str(sft), "--max-steps", "2", "--batch-size", "4",
                 "--lr", "1e-3", "--no-progress"]) == 0
    assert (sft / "model" / "config.json").is_file()
    assert main(["train-lcdd", "--tiny", "qwen3", "--sft", str(sft / "model"), "--out", str(run), "--max-steps", "3",
                 "--batch-size", "4", "--warmup", "1", "--lambda-init", "1", "--mask-lr", "5", "--no-progress"]) == 0
    assert "LCDD done: 3 steps" in capsys.readouterr().out
    assert main(["inspect", str(run / "carrier")]) == 0
    table = capsys.readouterr().out
    assert "ffn_hidden" in table and "total" in table and "of the projection weights" in table
    assert main(["inspect", str(run / "carrier"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen3" and len(info["sparsity"]["layers"]) == 2
    out = tmp_path / "again"
    assert main(["extract", "--tiny", "qwen3", "--model", str(sft / "model"), "--checkpoint",
                 str(run / "checkpoint-3"), "--out", str(out)]) == 0
    assert (out / "carrier.safetensors").read_bytes() == (run / "carrier" / "carrier.safetensors").read_bytes()
    # never overwrites silently
    assert main(["extract", "--tiny", "qwen3", "--model", str(sft / "model"), "--checkpoint",
                 str(run / "checkpoint-3"), "--out", str(out)]) == 2
    assert "already holds a carrier" in capsys.readouterr().err
    # train-lcdd's default --non-projection sft trained the norms: a strict extraction would drop them
    assert main(["extract", "--tiny", "qwen3", "--model", str(sft / "model"), "--checkpoint",
                 str(run / "checkpoint-3"), "--out", str(tmp_path / "strict"), "--non-projection", "base"]) == 2
    assert "pass --non-projection sft" in capsys.readouterr().err


def test_user_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no carrier_config.json" in capsys.readouterr().err
    assert main(["train-lcdd", "--base", str(tmp_path), "--sft", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--data", "x.jsonl"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["train-sft", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        main(["train-sft", "--tiny", "gpt2", "--out", str(tmp_path / "o")])


def test_extract_from_authors_theta(tmp_path, capsys):
    """lcdd extract --theta on the authors' l0_masks.pt (their saved model holds W_eff merged)."""
    from lcdd_kernels.models.families import Dims
    from lcdd_kernels.models.tiny import tiny_model, tiny_tokenizer

    sft = tiny_model("llama", seed=1)
    sft.save_pretrained(tmp_path / "their-run")
    tiny_tokenizer().save_pretrained(tmp_path / "their-run")
    n = Dims.from_config(sft).num_masks
    theta = torch.randn(n, generator=torch.Generator().manual_seed(0))
    torch.save({"theta": theta}, tmp_path / "their-run" / "l0_masks.pt")
    (tmp_path / "their-run" / "l0_config.json").write_text(json.dumps({"n_masks": n}))
    assert main(["extract", "--tiny", "llama", "--model", str(tmp_path / "their-run"), "--theta",
                 str(tmp_path / "their-run"), "--out", str(tmp_path / "c"), "--carrier-dtype", "bfloat16"]) == 0
    from lcdd_kernels import load_carrier

    c = load_carrier(tmp_path / "c")
    assert c.dtype == torch.bfloat16 and torch.equal(c.theta, theta)
    assert c.stats()["overall"]["active"] == int((theta > 0).sum())


def test_cli_tiny_families_are_the_tiny_table():
    from lcdd_kernels.cli.models_io import TINY_FAMILIES
    from lcdd_kernels.models.tiny import TINY

    assert TINY_FAMILIES == tuple(TINY)
