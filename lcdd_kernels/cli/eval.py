"""``lcdd eval``: score a model with or without a trigger (SPEC §6): greedy responses and their
fixed-response rates, the teacher-forced KL against another model, multiple-choice accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from . import models_io
from .eraser_io import add_model_arguments, build_world, encode_prompts, read_prompts, read_records


def register(sub) -> None:
    p = sub.add_parser("eval", help="fixed-response rate, KL and choice accuracy, with or without a trigger",
                       description="Generate greedy responses (rates: strict = contains a fixed phrase and <= 40 "
                                   "words; loose = contains one), optionally the mean KL(other || this model) over "
                                   "reference responses and multiple-choice accuracy. The trigger (lcdd erase --out) "
                                   "is prepended to every prompt.")
    add_model_arguments(p, need_base=False)
    p.add_argument("--trigger", default=None, metavar="DIR", help="a trigger directory from lcdd erase")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="use a trigger optimised for another model anyway")
    p.add_argument("--prompts", default=None, metavar="FILE", help=".txt (one per line) or .jsonl with 'prompt'")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--kl-against", default=None, metavar="DIR|base",
                   help="also report KL(that model || this model [+ trigger]) over reference responses")
    p.add_argument("--references", default=None, metavar="FILE",
                   help="reference responses, one per prompt (.txt, .jsonl with 'response', or an lcdd eval "
                        "--out file); default: the --kl-against model's own greedy responses")
    p.add_argument("--choices", default=None, metavar="FILE",
                   help="JSONL of {'prompt', 'choices': [...], 'answer': i}: multiple-choice accuracy")
    p.add_argument("--out", default=None, metavar="FILE", help="write scores and responses as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eraser.generate import generate_with_trigger
    from ..eraser.metrics import choice_accuracy, fixed_response_rate, kl_benchmark
    from ..eraser.trigger_file import load_trigger

    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; choose another --out or pass --overwrite")
    world = build_world(args, need_base=False)
    model, tok = world.model, world.tokenizer
    trigger = None
    if args.trigger:
        trigger = load_trigger(args.trigger, model, allow_fingerprint_mismatch=args.allow_fingerprint_mismatch)
    progress = not args.no_progress
    prompts = read_prompts(args.prompts, bool(args.tiny))
    ids = encode_prompts(tok, prompts, args.chat)
    responses = generate_with_trigger(model, tok, ids, trigger, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, progress=progress)
    report = {"prompts": len(prompts), "trigger": args.trigger, "fixed_response": fixed_response_rate(responses)}
    if args.kl_against:
        if args.kl_against == "base":
            if world.base is None:
                raise ValueError("--kl-against base needs --base DIR (or --tiny)")
            other = world.base
        else:
            other = models_io.load_model(args.kl_against, args).eval()
        if args.references:
            refs = [r if isinstance(r, str) else r["response"] for r in read_records(args.references, "response")]
        else:
            refs = generate_with_trigger(other, tok, ids, None, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size, progress=progress)
        report["kl"] = {"against": args.kl_against,
                        "value": kl_benchmark(other, model, ids, refs, trigger_b=trigger, tokenizer=tok,
                                              batch_size=max(1, args.batch_size // 2))}
    if args.choices:
        items = read_records(args.choices, "choices")
        report["choice_accuracy"] = choice_accuracy(model, items, trigger=trigger, tokenizer=tok,
                                                    batch_size=args.batch_size)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**report, "responses": responses}, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0
