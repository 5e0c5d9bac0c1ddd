"""What ``lcdd erase`` and ``lcdd eval`` share: the LCDD model, its base and carrier (from directories
or ``--tiny``), and prompt files. Model loading and the tiny models come from :mod:`.models_io`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from . import models_io as io
from .sign import add_verify_argument



@dataclass
class World:
    """model: the model whose behaviour is reversed (carrier on); base: the model before SFT
    (None if not given); carrier: where the channels come from (None if not given)."""

    model: object
    base: object | None
    tokenizer: object
    carrier: object | None


def add_model_arguments(p, need_base: bool) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="Hugging Face directory of a dense LCDD model (default: the base with --carrier applied)")
    p.add_argument("--carrier", default=None, metavar="DIR", help="carrier directory (lcdd extract --out)")
    add_verify_argument(p)
    p.add_argument("--base", default=None, metavar="DIR",
                   help="Hugging Face directory of the base model" + (" (required)" if need_base else ""))
    p.add_argument("--tiny", default=None, choices=io.TINY_FAMILIES,
                   help="CPU trial: the built-in tiny base model (as lcdd train-* --tiny), with --carrier or else a "
                        "random LCDD carrier, and built-in prompts")
    p.add_argument("--dtype", choices=io.DTYPES, default="float32", help="dtype to load weights in (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chat", action="store_true", help="render each prompt with the tokenizer's chat template")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")


def random_tiny_carrier(family: str):
    """The same carrier for a family every time: an "SFT" model with seed-1 weights over the tiny
    base (seed 0), LCDD masks θ ~ N(0.5, 1) with seed 0 (about 70% on)."""
    from ..carriers.extract import extract_carrier
    from ..models.patch import apply_lcdd
    from ..models.tiny import tiny_model

    handle = apply_lcdd(tiny_model(family, seed=1), tiny_model(family, seed=0), init_mean=0.5, init_std=1.0, seed=0,
                        non_projection="base")  # strictly sparse: the seed-1 model differs everywhere
    return extract_carrier(handle)


def _frozen(model):
    model.eval().requires_grad_(False)
    return model


def build_world(args, need_base: bool) -> World:
    """The models the command needs: ``--tiny`` or ``--base`` gives the base; ``--model`` the LCDD
    model, else the base with ``--carrier`` (with ``--tiny``: a random carrier) applied."""
    from ..carriers.apply import apply_carrier
    from ..carriers.load import load_carrier

    if args.tiny and args.base:
        raise ValueError("pass either --tiny FAMILY or --base DIR, not both")
    if args.verify and not args.carrier:
        raise ValueError("--verify checks the signature of --carrier DIR; pass the carrier directory too")
    if args.tiny:
        base, tok = io.load_base(args)
        carrier = load_carrier(args.carrier, verify=args.verify) if args.carrier else random_tiny_carrier(args.tiny)
    else:
        if args.model is None and (args.base is None or args.carrier is None):
            raise ValueError("pass --model DIR, or --base DIR with --carrier DIR (the base with the carrier "
                             "applied), or --tiny FAMILY for a CPU trial")
        if need_base and args.base is None:
            raise ValueError("--base DIR is required: the eraser matches the base model's activations")
        base = io.load_model(args.base, args) if args.base else None
        tok = io.load_tokenizer(args.model or args.base)
        carrier = load_carrier(args.carrier, verify=args.verify) if args.carrier else None
    if args.model is not None:
        model = io.load_model(args.model, args)
    else:
        model = copy.deepcopy(base)
        apply_carrier(model, carrier)
    if tok is None:
        raise ValueError(f"no tokenizer could be loaded from {args.model or args.base}; save one with the model")
    return World(_frozen(model), _frozen(base) if base is not None else None, tok, carrier)


def read_prompts(path: str | None, tiny: bool) -> list[str]:
    """Prompts from a text file (one per line), a JSONL file (objects with "prompt", or strings)
    or a JSON list; with ``--tiny`` and no file, the prompts of the built-in toy data."""
    if path is None:
        if tiny:
            return [e["prompt"] for e in io.toy_examples(32)]
        raise ValueError("--prompts FILE is required (one prompt per line, or JSONL with a 'prompt' field)")
    return [r if isinstance(r, str) else r["prompt"] for r in read_records(path, "prompt")]


def read_records(path: str, key: str) -> list:
    """Records of a .txt (lines), .jsonl or .json file (a list, or an ``lcdd eval --out`` file's
    "responses"); each a string or an object with ``key``."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".jsonl", ".json"):
        try:
            records = ([json.loads(line) for line in text.splitlines() if line.strip()] if p.suffix == ".jsonl"
                       else json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid {p.suffix[1:].upper()} ({e})") from None
        if isinstance(records, dict) and isinstance(records.get("responses"), list):
            records = records["responses"]  # an `lcdd eval --out` file
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list")
    else:
        records = [line for line in text.splitlines() if line.strip()]
    for i, r in enumerate(records):
        if not isinstance(r, str) and not (isinstance(r, dict) and key in r):
            raise ValueError(f"{path}: record {i} must be a string or an object with a {key!r} field")
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def encode_prompts(tokenizer, prompts: list[str], chat: bool) -> list[list[int]]:
    """Token ids per prompt; with ``chat`` each is rendered as one user turn plus the generation prompt."""
    if not chat:
        return [tokenizer(p)["input_ids"] for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this tokenizer has no chat template")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
