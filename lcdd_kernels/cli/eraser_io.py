"""What ``lcdd erase`` and ``lcdd eval`` share: loading models, carriers and prompt files, and the
``--tiny`` world (a base model, an LCDD carrier and prompts built in memory, for CPU trials)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
#: prompts of the --tiny world (the tiny tokenizer is character level)
TINY_PROMPTS = [f"{q} {w}?" for q in ("what is", "who is", "where is", "why is", "how is")
                for w in ("a cat", "the sun", "paris", "music", "rain", "a tree", "math", "sleep")]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class World:
    """model: the model whose behaviour is reversed (carrier on); base: the model before SFT;
    carrier: where the channels come from (may be None when --model is a dense LCDD model)."""

    model: object
    base: object
    tokenizer: object
    carrier: object | None


def add_model_arguments(p, need_base: bool) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="Hugging Face model directory (default: --base with --carrier applied)")
    p.add_argument("--carrier", default=None, metavar="DIR", help="carrier directory (lcdd extract / save)")
    p.add_argument("--base", default=None, metavar="DIR", required=False,
                   help="the base model directory" + (" (required)" if need_base else ""))
    p.add_argument("--tiny", default=None, choices=TINY_FAMILIES,
                   help="CPU trial: a tiny base model, a random LCDD carrier and prompts built in memory")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--chat", action="store_true", help="render each prompt with the tokenizer's chat template")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")


def device_dtype(args) -> tuple[str, torch.dtype]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to PyTorch here; use --device cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def load_model(directory: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if not Path(directory, "config.json").exists():
        raise FileNotFoundError(f"{directory}: no config.json; pass a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def tiny_world(family: str, device: str, dtype: torch.dtype) -> World:
    """The same world for the same family every time (seeded), so that a trigger from
    ``lcdd erase --tiny F`` loads in ``lcdd eval --tiny F``: base = tiny model seed 0; SFT = the
    base with seed-1 weights; LCDD masks N(0.5, 1) (about 70% on), seed 0; the carrier applied."""
    from ..carriers.apply import apply_carrier
    from ..carriers.format import extract_carrier
    from ..models.patch import apply_lcdd
    from ..models.tiny import tiny_model, tiny_tokenizer

    base = tiny_model(family, seed=0)
    handle = apply_lcdd(tiny_model(family, seed=1), base, init_mean=0.5, init_std=1.0, seed=0)
    carrier = extract_carrier(handle)
    model = tiny_model(family, seed=0)
    apply_carrier(model, carrier)
    for m in (model, base):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return World(model, base, tiny_tokenizer(), carrier)


def build_world(args, need_base: bool) -> World:
    """The models the command needs, from --tiny or from directories."""
    from ..carriers.apply import apply_carrier
    from ..carriers.format import load_carrier

    device, dtype = device_dtype(args)
    if args.tiny:
        return tiny_world(args.tiny, device, dtype)
    if args.model is None and (args.base is None or args.carrier is None):
        raise ValueError("pass --model DIR, or --base DIR with --carrier DIR (the base with the carrier "
                         "applied), or --tiny FAMILY for a CPU trial")
    if need_base and args.base is None:
        raise ValueError("--base DIR is required: the eraser matches the base model's activations")
    carrier = load_carrier(args.carrier) if args.carrier else None
    base = load_model(args.base, device, dtype) if args.base else None
    if args.model is not None:
        model = load_model(args.model, device, dtype)
        tok_dir = args.model
    else:
        model = load_model(args.base, device, dtype)
        apply_carrier(model, carrier)
        tok_dir = args.base
    return World(model, base, load_tokenizer(tok_dir), carrier)


def read_prompts(path: str | None, tiny: bool) -> list[str]:
    """Prompts from a text file (one per line), a JSONL file (objects with "prompt", or strings)
    or a JSON list; the --tiny prompts when no file is given with --tiny."""
    if path is None:
        if tiny:
            return list(TINY_PROMPTS)
        raise ValueError("--prompts FILE is required (one prompt per line, or JSONL with a 'prompt' field)")
    return [r if isinstance(r, str) else r["prompt"] for r in read_records(path, "prompt")]


def read_records(path: str, key: str) -> list:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSONL ({e})") from None
    elif p.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
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
