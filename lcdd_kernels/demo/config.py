"""The demo's settings: one run's configuration, its presets (full, quick) and ``--set`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .base import BaseTraining, ModelSize
from .world import DEFAULT_TASKS

STAGES = ("base", "sft", "lcdd", "lcdd_eraser", "sft_eraser")


@dataclass
class EraserSettings:
    """The eraser options the demo uses (SPEC §5 names); the rest keep the paper's defaults."""

    steps: int = 400
    trigger_length: int = 20
    max_norm: float | None = 1.0
    kappa: float = 0.7
    tail_k: int = 16
    l2: float = 0.1
    lr: float = 3e-3
    batch_size: int = 16
    channel_kind: str = "write"
    # Append the base model's greedy answer to each eraser prompt, so that the tail KL (tail_k)
    # covers response positions and the channels are matched at the answer's last token (SPEC §5
    # uses the prompt alone: its KL sees only the first response token).
    base_answers: bool = True


@dataclass
class DemoConfig:
    """Every setting of a demo run; the defaults are the full run (``lcdd demo``).

    Toy-scale choices (docs/guides/demo.md): the learning rates are those of a model trained from
    scratch, not the paper's 2e-5; ``lambda_min`` is 0.01 because the SFT loss of a fixed response
    is about 1e-6, so the budget ε = 1.3·baseline is out of reach as soon as a mask turns off and
    λ rests on its floor (LCDD then runs as a fixed L0 penalty of 0.01).
    """

    family: str = "qwen3"
    behaviour: str = "fixed"  # fixed | refusal | style (behaviours.BEHAVIOURS)
    seed: int = 0         # phases 1-3: SFT data order, LCDD, the eraser's initial trigger
    world_seed: int = 0   # the world's splits and phase 0 (the shipped base model is world 0)
    size: ModelSize = field(default_factory=ModelSize)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    min_len: int = 3      # task inputs have min_len..max_len characters
    max_len: int = 8
    n_train: int = 2000   # SFT prompts (phase 1 and 2 data)
    n_eraser: int = 200   # prompts the eraser optimises on
    n_heldout: int = 200  # prompts every number of the report is measured on
    base: BaseTraining = field(default_factory=BaseTraining)
    sft_steps: int = 300
    sft_lr: float = 1e-3
    sft_batch: int = 32
    lcdd_steps: int = 1500
    lcdd_lr: float = 1e-3
    lcdd_batch: int = 32
    mask_lr: float = 0.5
    lcdd_warmup: int = 50
    budget_ratio: float = 0.3
    lambda_init: float = 0.01
    lambda_lr: float = 0.1
    lambda_min: float = 0.01
    violation_clip: float | None = None  # DualController's V (None: unclipped, SPEC's default)
    eraser: EraserSettings = field(default_factory=EraserSettings)
    max_new_tokens: int = 24
    base_from: str | None = None  # reuse DIR/base of an earlier run (same family, world, size)
    train_base: bool = False  # train phase 0 even when the package ships a base model for this world

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named settings: dotted DemoConfig fields -> value. "full" is DemoConfig's defaults.
PRESETS: dict[str, dict] = {
    "full": {},
    # With the shipped base (no phase 0) 109 s on 2 idle cores (LCDD 49 s of it; docs/demo/behaviours.md):
    # mask_lr 2.0 doubles the L0 pressure so that 250 LCDD steps reach the sparsity goal. The base.*
    # values apply with --train-base: a shorter base schedule wants a lower peak lr (measured, seeds 0-2: 2e-3 over
    # 600 steps reaches 0.93-0.99 validation exact match; 3e-3 over 800 steps 0.91-0.98 at 700).
    "quick": {"base.steps": 600, "base.lr": 2e-3, "base.target": 0.95, "sft_steps": 100, "lcdd_steps": 250,
              "lcdd_warmup": 25, "mask_lr": 2.0, "eraser.steps": 120},
    # The test suite's run: every phase and file, numbers meaningless.
    "test": {"size.hidden": 32, "size.ffn": 64, "size.layers": 2, "base.steps": 4, "base.eval_size": 8,
             "sft_steps": 3, "lcdd_steps": 4, "lcdd_warmup": 2, "eraser.steps": 3, "eraser.trigger_length": 4,
             "n_train": 32, "n_eraser": 8, "n_heldout": 8, "max_new_tokens": 8},
}


def _parse(value: str, current):
    if isinstance(current, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if value.lower() == "none":
        return None
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float) or current is None:
        return float(value)
    return value


def set_field(cfg: DemoConfig, dotted: str, value) -> None:
    """Set ``cfg.a.b = value`` for ``dotted = "a.b"``; a string value is parsed to the field's type."""
    *path, name = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            raise ValueError(f"no demo setting {dotted!r}; see lcdd_kernels.demo.config.DemoConfig")
    fields = {f.name for f in dataclasses.fields(obj)}
    if name not in fields:
        raise ValueError(f"no demo setting {dotted!r}; {'.'.join(path) or 'DemoConfig'} has {sorted(fields)}")
    if isinstance(value, str):
        try:
            value = _parse(value, getattr(obj, name))
        except ValueError as e:
            raise ValueError(f"--set {dotted}: {e}") from None
    setattr(obj, name, value)


def preset(name: str = "full", family: str = "qwen3", seed: int = 0, overrides=()) -> DemoConfig:
    """A :class:`DemoConfig` from a preset, then ``overrides`` (``"field=value"`` strings)."""
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = DemoConfig(family=family, seed=seed)
    for key, value in PRESETS[name].items():
        set_field(cfg, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        set_field(cfg, key.strip(), value.strip())
    return cfg
