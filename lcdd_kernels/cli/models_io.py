"""Model and data loading shared by the training and carrier commands: a local model directory
or a built-in tiny model (``--tiny llama|mistral|qwen2|qwen3``)."""

from __future__ import annotations

from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
#: models.tiny.TINY's keys, spelled out so that parsing the command line does not import torch
#: (tests/train/test_cli.py checks they agree).
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

#: The built-in data for ``--tiny`` runs: a fixed response to varied questions (SPEC §6's behaviour).
TOY_RESPONSE = "I don't know."
_TOY_TOPICS = ("the moon", "rivers", "prime numbers", "music", "old maps", "glass", "bees", "clocks",
               "winter", "paper", "salt", "bridges", "owls", "copper", "rain", "chess")


def toy_examples(n: int = 64) -> list[dict]:
    """``n`` prompt/response pairs: questions about a topic, always answered ``TOY_RESPONSE``."""
    forms = ("What do you know about {}?", "Tell me about {}.", "Explain {} briefly.", "Why does {} matter?")
    return [{"prompt": forms[i % len(forms)].format(_TOY_TOPICS[i % len(_TOY_TOPICS)]), "response": TOY_RESPONSE}
            for i in range(n)]


def add_non_projection_arg(p) -> None:
    p.add_argument("--non-projection", choices=("sft", "base"), default="sft",
                   help="the SFT model's norms, biases, embeddings and lm_head: 'sft' (default, the authors' "
                        "recipe) keeps them (norms and biases train; the carrier stores what differs from the "
                        "base densely); 'base' sets them to the base and freezes them (strictly sparse carrier)")


def add_model_args(p, what: str = "base model") -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tiny", choices=TINY_FAMILIES,
                   help="a built-in tiny model (random weights, seed 0) and character tokenizer, for trying things on a CPU")
    g.add_argument("--base", metavar="DIR", help=f"local Hugging Face directory of the {what}")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load weights in (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def device(args):
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_model(path, args):
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=getattr(torch, args.dtype))
    model.config.use_cache = False
    return model.to(device(args))


def load_base(args):
    """(base model, tokenizer or None) from ``--tiny`` or ``--base``."""
    import torch

    if args.tiny:
        from ..models.tiny import tiny_model, tiny_tokenizer

        torch.set_num_threads(1)  # a tiny model gains nothing from threads and loses much on a busy machine

        model = tiny_model(args.tiny, seed=0, dtype=getattr(torch, args.dtype)).to(device(args))
        model.config._name_or_path = f"lcdd-tiny-{args.tiny}"
        return model, tiny_tokenizer()
    return load_model(args.base, args), load_tokenizer(args.base)


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def load_data(args):
    """A JSONL path from ``--data``, or the toy examples for ``--tiny`` runs."""
    if args.data:
        return args.data
    if args.tiny:
        return toy_examples()
    raise ValueError("--data FILE.jsonl is required (lines of {\"prompt\", \"response\"} or {\"messages\"})")


def add_train_args(p, epochs: float, lr: float) -> None:
    p.add_argument("--data", metavar="JSONL", help="training data: {\"prompt\",\"response\"} or {\"messages\"} per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate of the weights (default {lr})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=None, metavar="STEPS", help="checkpoint every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fullgraph, dynamic shapes; the first steps include compile time)")
    p.add_argument("--compile-backend", default="inductor", metavar="NAME",
                   help="torch.compile backend with --compile (default inductor; aot_eager compiles in seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_config(args, **extra):
    from ..train import TrainConfig

    return TrainConfig(lr=args.lr, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, max_length=args.max_length, seed=args.seed,
                       save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing,
                       compile=args.compile, compile_backend=args.compile_backend,
                       progress=not args.no_progress, **extra)
