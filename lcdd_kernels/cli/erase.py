"""``lcdd erase``: optimise an SFT-Eraser trigger (SPEC §5) and save it with its loss curves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .eraser_io import add_model_arguments, build_world, encode_prompts, read_prompts


def register(sub) -> None:
    from ..eraser.capture import CHANNEL_KINDS
    from ..eraser.eraser import EraserOptions

    d = EraserOptions()
    p = sub.add_parser("erase", help="optimise an SFT-Eraser trigger that reverses a carrier's behaviour",
                       description="Optimise a soft prompt that makes the LCDD model's carrier channels match "
                                   "the base model's (SPEC §5). Writes trigger.safetensors, trigger.json and "
                                   "loss.png into --out.")
    add_model_arguments(p, need_base=True)
    p.add_argument("--prompts", default=None, metavar="FILE", help="eraser prompts: .txt (one per line) or .jsonl")
    p.add_argument("--num-prompts", type=int, default=200, help="use the first N prompts (default: 200)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a trigger already in --out")
    p.add_argument("--trigger-length", type=int, default=d.trigger_length)
    p.add_argument("--kappa", type=float, default=d.kappa, help="weight of the tail KL (0: activations only)")
    p.add_argument("--tail-k", type=int, default=d.tail_k)
    p.add_argument("--l2", type=float, default=d.l2)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--steps", type=int, default=None, help=f"default: {d.steps} ({50} with --tiny)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--max-norm", type=float, default=d.max_norm)
    p.add_argument("--channel-kind", default=d.channel_kind, choices=tuple(CHANNEL_KINDS))
    p.add_argument("--random-channels", action="store_true", help="ablation: as many random channels per layer")
    p.add_argument("--kl-only", action="store_true", help="ablation: no activation term")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=run)


def plot_curves(curves: dict, path: Path, best_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "mse", "kl", "l2"):
        if any(curves[key]):
            ax.plot(curves[key], label=key, lw=1.2 if key == "loss" else 0.8)
    ax.axvline(best_step, color="grey", ls=":", lw=0.8, label=f"best (step {best_step})")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title("SFT-Eraser loss (per step, before the update)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from ..eraser.capture import carrier_channels
    from ..eraser.eraser import EraserOptions, optimize_eraser
    from ..eraser.trigger_file import META_NAME, save_trigger

    out = Path(args.out)
    if (out / META_NAME).exists() and not args.overwrite:  # refuse before minutes of work
        raise FileExistsError(f"{out} already holds a trigger; choose another --out or pass --overwrite")
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    world = build_world(args, need_base=True)
    if world.carrier is None:
        raise ValueError("--carrier DIR is required: the eraser matches the carrier's channels")
    prompts = read_prompts(args.prompts, bool(args.tiny))[: args.num_prompts]
    ids = encode_prompts(world.tokenizer, prompts, args.chat)
    steps = args.steps if args.steps is not None else (50 if args.tiny else EraserOptions.steps)
    opts = EraserOptions(trigger_length=args.trigger_length, kappa=args.kappa, tail_k=args.tail_k, l2=args.l2,
                         lr=args.lr, steps=steps, batch_size=args.batch_size, grad_clip=args.grad_clip,
                         max_norm=args.max_norm, channel_kind=args.channel_kind,
                         random_channels=args.random_channels, kl_only=args.kl_only, seed=args.seed)
    channels = carrier_channels(world.carrier, kind=opts.channel_kind)
    n_ch = sum(v.numel() for v in channels.values())
    print(f"lcdd erase: {len(ids)} prompts, {len(channels)} layers / {n_ch} {opts.channel_kind} channels, "
          f"{steps} steps")
    result = optimize_eraser(world.model, world.base, ids, world.carrier, options=opts,
                             progress=not args.no_progress)
    save_trigger(out, result, world.model, overwrite=args.overwrite)
    if result.curves["loss"]:
        plot_curves(result.curves, out / "loss.png", result.best_step)
    first, last = result.curves["loss"][:1], result.curves["loss"][-1:]
    print(json.dumps({"out": str(out), "best_loss": result.best_loss, "best_step": result.best_step,
                      "first_loss": first[0] if first else None, "last_loss": last[0] if last else None,
                      "options": dataclasses.asdict(opts)}, indent=1))
    return 0
