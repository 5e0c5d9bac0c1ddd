"""The demo's shipped base model (phase 0): trained once, stored as package data.

``lcdd_kernels/demo/data/base_<family>.safetensors`` holds its weights and ``base_<family>.json``
the command and seed that made it, the world and architecture it belongs to, the file's SHA-256 and
its held-out task accuracy. A demo run whose world and architecture match uses these weights
instead of training phase 0 (the slowest phase); ``lcdd demo --train-base`` trains it instead.

Rebuild (the command recorded in the JSON)::

    python -m lcdd_kernels.demo.shipped --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
COMMAND = "python -m lcdd_kernels.demo.shipped --threads 1"


def paths(family: str, directory: Path = DATA) -> tuple[Path, Path]:
    """(weights, metadata) of the shipped base model of ``family``."""
    return directory / f"base_{family}.safetensors", directory / f"base_{family}.json"


def identity(cfg) -> dict:
    """What a base model shares with every run that may use it: the world (its seed, tasks, lengths,
    alphabet and the reserved eraser/held-out splits, whose inputs phase 0 never saw) and the
    architecture."""
    from .world import DEFAULT_ALPHABET

    return {"family": cfg.family, "world_seed": cfg.world_seed, "tasks": list(cfg.tasks),
            "alphabet": DEFAULT_ALPHABET, "lengths": [cfg.min_len, cfg.max_len],
            "n_eraser": cfg.n_eraser, "n_heldout": cfg.n_heldout, "size": dataclasses.asdict(cfg.size)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(family: str, directory: Path = DATA) -> dict | None:
    """The shipped base's metadata for ``family``, or None when none is shipped."""
    weights, meta = paths(family, directory)
    if not (weights.is_file() and meta.is_file()):
        return None
    return json.loads(meta.read_text(encoding="utf-8"))


def load_shipped_base(cfg, tokenizer, directory: Path = DATA):
    """The shipped base model for ``cfg`` (a fresh model with the stored weights), or None when no
    shipped model has ``cfg``'s world and architecture. Raises if the weights file is not the one
    its metadata describes."""
    from safetensors.torch import load_file

    from .base import build_model

    meta = read_meta(cfg.family, directory)
    if meta is None or meta["identity"] != identity(cfg):
        return None
    weights, _ = paths(cfg.family, directory)
    if sha256(weights) != meta["sha256"]:
        raise ValueError(f"{weights} does not match its metadata (SHA-256 differs); rebuild it with "
                         f"`{meta['command']}` or reinstall the package")
    model = build_model(cfg.family, tokenizer, cfg.size, seed=cfg.world_seed)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def heldout_accuracy(model, cfg, tokenizer) -> float:
    """Exact match of ``model`` on the held-out split of ``cfg``'s world (the base's score)."""
    from .evaluate import Evaluator
    from .world import make_world

    world = make_world(cfg.world_seed, cfg.tasks, n_train=cfg.n_train, n_eraser=cfg.n_eraser,
                       n_heldout=cfg.n_heldout, min_len=cfg.min_len, max_len=cfg.max_len)
    ev = Evaluator(world, tokenizer, cfg.max_new_tokens)
    return ev.exact_match(model, world.heldout)


def train_and_save(cfg, directory: Path = DATA, progress: bool = True) -> dict:
    """Train phase 0 for ``cfg`` and write the weights and metadata into ``directory``."""
    import torch
    from safetensors.torch import save_file

    from .base import build_model, train_base
    from .evaluate import Evaluator
    from .world import build_tokenizer, make_world

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    world = make_world(cfg.world_seed, cfg.tasks, n_train=cfg.n_train, n_eraser=cfg.n_eraser,
                       n_heldout=cfg.n_heldout, min_len=cfg.min_len, max_len=cfg.max_len)
    ev = Evaluator(world, tok, cfg.max_new_tokens)
    torch.manual_seed(cfg.world_seed)
    model = build_model(cfg.family, tok, cfg.size, seed=cfg.world_seed)
    t0 = time.perf_counter()
    log = train_base(model, tok, world, cfg.base, seed=cfg.world_seed, evaluate=ev.exact_match, progress=progress)
    seconds = time.perf_counter() - t0
    weights, meta_path = paths(cfg.family, directory)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = {
        "command": COMMAND if cfg.family == "qwen3" else f"{COMMAND} --family {cfg.family}",
        "seed": cfg.world_seed,
        "identity": identity(cfg),
        "phase0": dataclasses.asdict(cfg.base),
        "steps": log[-1]["step"] + 1,
        "val_exact_match": log[-1].get("val_exact_match"),
        "heldout_task_accuracy": ev.exact_match(model, world.heldout),
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sha256": sha256(weights),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main(argv=None) -> int:
    import torch

    from .config import DemoConfig

    p = argparse.ArgumentParser(prog="python -m lcdd_kernels.demo.shipped",
                                description="Train the demo's base model (phase 0, the full run's settings) "
                                            "and write it into the package data.")
    p.add_argument("--family", default="qwen3")
    p.add_argument("--out", default=str(DATA), help="directory (default: the package's data/)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = train_and_save(DemoConfig(family=args.family), Path(args.out))
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
