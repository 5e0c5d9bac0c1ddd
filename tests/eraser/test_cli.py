"""lcdd erase / lcdd eval end to end on the --tiny world, and their refusals."""

import json

from lcdd_kernels.cli import main


def test_erase_then_eval_tiny(tmp_path, capsys):
    out = tmp_path / "trig"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["what is x?", "who is y?", "a b c"]))
    args = ["erase", "--tiny", "llama", "--prompts", str(prompts), "--out", str(out), "--steps", "3",
            "--trigger-length", "4", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} == {"trigger.safetensors", "trigger.json", "loss.png"}
    meta = json.loads((out / "trigger.json").read_text())
    assert meta["options"]["steps"] == 3 and meta["channels_kind"] == "write" and len(meta["curves"]["loss"]) == 3
    assert main(args) == 2 and "already holds a trigger" in capsys.readouterr().err
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--tiny", "llama", "--trigger", str(out), "--prompts", str(prompts), "--max-new-tokens", "3",
                 "--kl-against", "base", "--out", str(report), "--no-progress"]) == 0
    data = json.loads(report.read_text())
    assert len(data["responses"]) == 3 and data["fixed_response"]["n"] == 3 and data["kl"]["value"] >= 0
    # the trigger belongs to the tiny llama world, not the tiny qwen2 one
    assert main(["eval", "--tiny", "qwen2", "--trigger", str(out), "--no-progress"]) == 2
    assert "optimised for another model" in capsys.readouterr().err


def test_erase_needs_models_and_prompts(tmp_path, capsys):
    assert main(["erase", "--out", str(tmp_path / "t"), "--prompts", "x.txt"]) == 2
    assert "--base DIR with --carrier DIR" in capsys.readouterr().err
    assert main(["erase", "--tiny", "qwen3", "--out", str(tmp_path / "t"), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tiny_with_a_saved_carrier(tmp_path, capsys):
    from lcdd_kernels.cli.eraser_io import random_tiny_carrier

    random_tiny_carrier("qwen2").save(tmp_path / "carrier")
    out = tmp_path / "trig"
    assert main(["erase", "--tiny", "qwen2", "--carrier", str(tmp_path / "carrier"), "--out", str(out),
                 "--steps", "2", "--trigger-length", "3", "--kappa", "0", "--channel-kind", "ffn_write",
                 "--no-progress"]) == 0
    meta = json.loads((out / "trigger.json").read_text())
    assert meta["channels_kind"] == "ffn_write" and meta["options"]["kappa"] == 0.0
    assert main(["erase", "--tiny", "qwen2", "--base", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "either --tiny FAMILY or --base DIR" in capsys.readouterr().err
