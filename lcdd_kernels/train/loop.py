"""The training loops: ``train_sft`` (phase 1, plain full SFT) and ``train_lcdd`` (phase 2, SPEC §3).

Both run the same loop; LCDD adds the masks' SGD, the dual controller and the sparsity penalty.
The penalty's gradient ``λ·min(1, step/warmup)·σ'(θ)`` is added to θ's gradient after backward
(:meth:`LCDDHandle.add_penalty_grad_`), which equals putting ``λ·w·Σσ(θ)`` into the loss and works
per shard under FSDP2. Gradient clipping (``max_grad_norm``) applies to the weights only.

Outputs in ``out_dir``: ``log.jsonl`` (one row per optimizer step), ``curves.png``,
``checkpoint-<step>/`` (resumable: weights, masks, optimizers, controller, data position) and,
for LCDD, the carrier in ``carrier/``; for SFT the model (``save_pretrained``) in ``model/``.
Under ``torch.distributed`` every rank takes its slice of each global micro-batch; checkpoints and
outputs are written by rank 0 in single-process runs only (use torch.distributed.checkpoint for
sharded runs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..dual import DualController
from .data import as_examples, collate, micro_batches

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """Loop settings. ``epochs`` is ignored when ``max_steps`` is given. ``batch_size`` is the
    global micro-batch (split across ranks); one optimizer step sees ``batch_size·grad_accum``
    examples. ``bf16=None`` means autocast to bfloat16 on CUDA, off on CPU."""

    lr: float = 2e-5
    mask_lr: float = 0.1
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    shuffle: bool = True
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    #: torch.compile the model's forward (and so its backward): fullgraph=True, dynamic batch and
    #: sequence dimensions (one compilation for every batch shape). ``compile_backend`` is any
    #: torch.compile backend ("inductor" generates kernels; "aot_eager" compiles in seconds).
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    train_on_prompt: bool = False
    save_every: int | None = None
    progress: bool = True
    plot: bool = True


@dataclass
class TrainResult:
    model: torch.nn.Module
    log: list[dict]
    out_dir: Path | None
    handle: object | None = None
    controller: DualController | None = None
    carrier: object | None = None
    extra: dict = field(default_factory=dict)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    _, world = _rank_world()
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= world
    return t


def latest_checkpoint(out_dir: Path) -> Path | None:
    cks = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.pt").is_file()]
    return max(cks, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):])) if cks else None


def _read_log(path: Path) -> list[dict]:
    """The rows of ``log.jsonl``. A last line cut short by a crash is dropped: rows are appended
    before the checkpoint of their step is written, so a torn row is always past the checkpoint."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON; the training log is damaged") from None
    return rows


def _prepare_out_dir(out_dir, resume: bool) -> tuple[Path | None, Path | None]:
    """(out_dir, checkpoint to resume from). Never reuses a directory with a log unless resuming."""
    if out_dir is None:
        if resume:
            raise ValueError("resume=True needs the out_dir of the run to resume")
        return None, None
    out = Path(out_dir)
    rank, world = _rank_world()
    if world > 1:
        if resume:
            raise ValueError("resume=True is single-process only; under torch.distributed save and load "
                             "sharded state with torch.distributed.checkpoint")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        return out, None  # only rank 0 writes (the log); no checkpoints under sharding
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if resume:
        if ckpt is None:
            raise FileNotFoundError(f"resume=True but {out} holds no {CHECKPOINT_PREFIX}<step>/ to resume from")
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new out_dir, or pass resume=True (CLI: --resume) "
                              "to continue the run in it")
    out.mkdir(parents=True, exist_ok=True)
    return out, ckpt


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, step: int, model, optimizers, controller, position) -> None:
    from safetensors.torch import save_file

    from ..atomic import publish_dir

    # published whole and durably: latest_checkpoint never sees half a checkpoint after a crash
    with publish_dir(out / f"{CHECKPOINT_PREFIX}{step}") as tmp:
        save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "position": list(position), "optimizers": [o.state_dict() for o in optimizers],
                    "controller": controller.state_dict() if controller else None,
                    "rng": torch.get_rng_state()}, tmp / "state.pt")


def _load_checkpoint(ck: Path, model, optimizers, controller) -> tuple[int, tuple[int, int]]:
    from safetensors.torch import load_file

    state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
    weights = load_file(str(ck / "trainable.safetensors"))
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != want:
        raise ValueError(f"{ck}: the checkpoint's trainable parameters do not match this model "
                         f"(missing {sorted(want - set(weights))[:3]}, unexpected {sorted(set(weights) - want)[:3]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    for opt, sd in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(sd)
    if controller is not None:
        controller.load_state_dict(state["controller"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), tuple(state["position"])


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing per decoder layer (the name changed in transformers 5.x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _on_device(batch: dict, device, rank: int, world: int) -> dict:
    b = batch["input_ids"].shape[0]
    lo, hi = rank * b // world, (rank + 1) * b // world
    return {k: v[lo:hi].to(device) for k, v in batch.items()}


def _run(model, examples, cfg: TrainConfig, out: Path | None, ckpt: Path | None, *, pad_id: int,
         handle=None, controller: DualController | None = None, desc: str = "train") -> list[dict]:
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of ranks ({world})")
    if cfg.grad_accum < 1 or cfg.batch_size < 1:
        raise ValueError("batch_size and grad_accum must be >= 1")
    device = next(model.parameters()).device
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    # The compiled module shares the model's parameters; checkpoints and outputs use the model.
    forward = (torch.compile(model, backend=cfg.compile_backend, mode=cfg.compile_mode, fullgraph=True, dynamic=True)
               if cfg.compile else model)

    if handle is not None:
        groups = handle.parameters()
        weights, masks = groups["weights"], groups["masks"]
    else:
        weights, masks = [p for p in model.parameters() if p.requires_grad], []
    if not weights:
        raise ValueError("nothing to train: no parameter requires grad")
    optimizers = [torch.optim.AdamW(weights, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if masks:
        optimizers.append(torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=0.0))

    per_epoch = max(1, len(examples) // cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    step, position = 0, (0, 0)
    if ckpt is not None:
        step, position = _load_checkpoint(ckpt, model, optimizers, controller)
    log_path = out / "log.jsonl" if out is not None else None
    log: list[dict] = []
    if log_path is not None and log_path.exists():
        log = [r for r in _read_log(log_path) if r["step"] <= step]
        if rank == 0:
            from ..atomic import write_file_atomic

            write_file_atomic(log_path, "".join(json.dumps(r) + "\n" for r in log))

    batches = micro_batches(examples, cfg.batch_size, cfg.seed, cfg.shuffle, *position)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not cfg.progress or rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < total:
        task_sum = 0.0
        for _ in range(cfg.grad_accum):
            epoch, index, items = next(batches)
            batch = _on_device(collate(items, pad_id), device, rank, world)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                task = forward(**batch).loss
            (task / cfg.grad_accum).backward()
            value = _mean_over_ranks(task.detach().float())
            if controller is not None:
                controller.observe(value)
            task_sum += float(value)
        position = (epoch, index + 1)
        if handle is not None:
            handle.add_penalty_grad_(controller.lam * controller.warmup_factor(step))
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "epoch": epoch, "task_loss": task_sum / cfg.grad_accum, "time": time.perf_counter() - t0}
        if controller is not None:
            lam_used = controller.lam * controller.warmup_factor(step - 1)
            controller.step(step)
            stats = handle.stats()["overall"]
            row.update(ema=controller.ema, epsilon=controller.epsilon, **{"lambda": controller.lam},
                       penalty_coef=lam_used, sparsity=stats["sparsity"], active=stats["active"])
        log.append(row)
        if rank == 0:
            if log_path is not None:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix({k: f"{row[k]:.4g}" for k in ("task_loss", "lambda", "sparsity") if row.get(k) is not None})
            bar.update(1)
            if out is not None and world == 1 and cfg.save_every and step % cfg.save_every == 0 and step < total:
                _save_checkpoint(out, step, model, optimizers, controller, position)
    bar.close()
    if out is not None and rank == 0 and world == 1:
        _save_checkpoint(out, step, model, optimizers, controller, position)
        if cfg.plot and log:
            from .plot import plot_log

            plot_log(log, out / "curves.png")
    return log


def _config(config: TrainConfig | None, overrides: dict, **defaults) -> TrainConfig:
    cfg = config or TrainConfig(**defaults)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}; see lcdd_kernels.train.TrainConfig")
    return dataclasses.replace(cfg, **overrides)


def _pad_id(tokenizer, model) -> int:
    for src in (tokenizer, getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None) if src is not None else None
        if pid is not None:
            return int(pid)
    return 0


def train_sft(model, data, tokenizer=None, out_dir=None, config: TrainConfig | None = None,
              resume: bool = False, train: str = "projections", **overrides) -> TrainResult:
    """Phase 1: SFT of ``model`` (in place) on ``data`` (JSONL path, raw or tokenized examples).
    Defaults from the authors' recipe: 3 epochs, AdamW lr 2e-5.

    ``train="projections"`` (default) trains the q/k/v/o and gate/up/down weights and freezes the
    rest; ``train="all"`` trains every parameter (plain full SFT). Phase 2 holds everything but the
    projection weights frozen: embeddings and lm_head at their values (SPEC §3); norms and biases
    keep training (``non_projection="sft"``, default) or are reset to the base
    (``non_projection="base"``: strictly sparse carriers, and what phase 1 changed there is dropped).
    Saves the model (and tokenizer) into ``out_dir/model``."""
    if train not in ("projections", "all"):
        raise ValueError(f"train must be 'projections' or 'all', got {train!r}")
    cfg = _config(config, overrides, epochs=3.0)
    out, ckpt = _prepare_out_dir(out_dir, resume)
    examples = as_examples(data, tokenizer, cfg.max_length, cfg.train_on_prompt)
    if train == "projections":
        from ..models.families import module_paths

        proj = {f"{path}.weight" for _, _, path in module_paths(model)}
        for name, p in model.named_parameters():
            p.requires_grad_(name in proj)
    log = _run(model, examples, cfg, out, ckpt, pad_id=_pad_id(tokenizer, model), desc="sft")
    if out is not None and _rank_world() == (0, 1):
        from ..atomic import publish_dir

        with publish_dir(out / "model") as tmp:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    return TrainResult(model, log, out)


def train_lcdd(model, base, data, tokenizer=None, out_dir=None, config: TrainConfig | None = None,
               controller: DualController | None = None, resume: bool = False, handle=None,
               init_mean: float = 1.5, init_std: float = 0.5, save_carrier: bool = True,
               non_projection: str = "sft", **overrides) -> TrainResult:
    """Phase 2: LCDD (SPEC §3). Patches ``model`` (SFT weights) against ``base`` with
    :func:`~lcdd_kernels.apply_lcdd` (or uses ``handle`` if the model is already patched, e.g.
    sharded with FSDP2), trains weights (AdamW) and masks (SGD, ``mask_lr``) under the dual
    controller (default: the authors' settings, warmup 300), and saves the carrier to
    ``out_dir/carrier``. ``non_projection``: what happens to the SFT model's norms, biases,
    embeddings and lm_head (``"sft"``: kept, norms and biases trained, the authors' recipe;
    ``"base"``: set to the base and frozen; see :func:`~lcdd_kernels.apply_lcdd`). Returns a
    :class:`TrainResult` whose ``handle`` still patches the model."""
    from ..models.patch import apply_lcdd

    cfg = _config(config, overrides)
    out, ckpt = _prepare_out_dir(out_dir, resume)
    examples = as_examples(data, tokenizer, cfg.max_length, cfg.train_on_prompt)
    if handle is None:
        handle = apply_lcdd(model, base, init_mean=init_mean, init_std=init_std, seed=cfg.seed,
                            non_projection=non_projection)
    controller = controller or DualController()
    log = _run(model, examples, cfg, out, ckpt, pad_id=_pad_id(tokenizer, model), handle=handle,
               controller=controller, desc="lcdd")
    carrier = None
    if out is not None and save_carrier and _rank_world() == (0, 1):
        from ..carriers.extract import extract_carrier

        carrier = extract_carrier(handle, metadata={
            "steps": log[-1]["step"] if log else 0, "lambda": controller.lam,
            "baseline": controller.baseline, "epsilon": controller.epsilon})
        carrier.save(out / "carrier", overwrite=resume)
    return TrainResult(model, log, out, handle, controller, carrier)
