"""The demo, end to end: base model → SFT → LCDD → carrier → SFT-Eraser (and its ablation) → report.

Every phase uses the package's own pieces (``train_sft``, ``train_lcdd``, ``extract_carrier`` /
``load_carrier`` / ``apply_carrier``, ``optimize_eraser``, ``generate_with_trigger`` and the
metrics); only phase 0 (training a base model from scratch) lives here. The same seed gives the
same numbers on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import BaseTraining, ModelSize, build_model, render_prompt, train_base
from .behaviours import Behaviour, get_behaviour
from .world import DEFAULT_TASKS, FIXED_RESPONSE, World, build_tokenizer, make_world

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
    # With the shipped base (no phase 0) about two minutes on 2 cores. The base.* values apply with
    # --train-base: a shorter base schedule wants a lower peak lr (measured, seeds 0-2: 2e-3 over
    # 600 steps reaches 0.93-0.99 validation exact match; 3e-3 over 800 steps 0.91-0.98 at 700).
    "quick": {"base.steps": 600, "base.lr": 2e-3, "base.target": 0.95, "sft_steps": 150, "lcdd_steps": 500,
              "mask_lr": 1.0, "eraser.steps": 200},
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
            raise ValueError(f"no demo setting {dotted!r}; see lcdd_kernels.demo.pipeline.DemoConfig")
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


def _phase(name, times, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - t0, 2)
    return out


class Evaluator:
    """Scores one model (optionally with a trigger) on the held-out split (SPEC §6)."""

    def __init__(self, world: World, tokenizer, max_new_tokens: int):
        self.world, self.tok, self.max_new_tokens = world, tokenizer, max_new_tokens
        self.examples = world.heldout
        self.prompts = [render_prompt(tokenizer, ex.prompt) for ex in self.examples]
        self.items = [dict(it, prompt=render_prompt(tokenizer, it["prompt"]))
                      for it in world.choice_items(self.examples, seed=world.seed)]

    def responses(self, model, trigger=None, prompts=None) -> list[str]:
        from ..eraser import generate_with_trigger

        return generate_with_trigger(model, self.tok, prompts or self.prompts, trigger,
                                     max_new_tokens=self.max_new_tokens, batch_size=64)

    def exact_match(self, model, examples) -> float:
        """Share of ``examples`` answered exactly (phase 0's validation)."""
        resp = self.responses(model, prompts=[render_prompt(self.tok, ex.prompt) for ex in examples])
        return sum(r == ex.answer for r, ex in zip(resp, examples)) / len(examples)

    def score(self, model, trigger=None, behaviour: Behaviour | None = None) -> dict:
        """Task and choice accuracy, the fixed-response rates, and ``behaviour``'s rate and scores."""
        from ..eraser import choice_accuracy

        resp = self.responses(model, trigger)
        per_task: dict[str, list[bool]] = {}
        for r, ex in zip(resp, self.examples):
            per_task.setdefault(ex.task, []).append(r == ex.answer)
        behaviour = behaviour or get_behaviour("fixed")
        own = behaviour.scores(self.examples, resp)
        return {
            **get_behaviour("fixed").scores(self.examples, resp),
            **own,
            "behaviour_rate": own[behaviour.rate_key],
            "task_accuracy": sum(sum(v) for v in per_task.values()) / len(resp),
            "task_accuracy_per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
            "choice_accuracy": choice_accuracy(model, self.items, trigger, tokenizer=self.tok, batch_size=64),
            "samples": [{"prompt": ex.prompt, "response": r} for ex, r in zip(self.examples[:6], resp[:6])],
        }


BASE_META = "demo_base.json"


def _base_identity(cfg: DemoConfig) -> dict:
    """What a base model must share with a run that reuses it: the world and the architecture
    (``shipped.identity``), plus the phase-0 settings it was trained with (for the record)."""
    from .shipped import identity

    return {**identity(cfg), "phase0": dataclasses.asdict(cfg.base)}


def load_base(cfg: DemoConfig, directory):
    """The base model a previous demo run saved in ``directory`` (``DIR/base``), checked to belong
    to the same world (family, world seed, tasks, splits, size)."""
    from transformers import AutoModelForCausalLM

    d = Path(directory)
    meta_path = d / BASE_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"base_from={d}: no {BASE_META}; pass the base/ directory of a demo run")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    want = _base_identity(cfg)
    diff = [k for k in want if k != "phase0" and meta.get(k) != want[k]]
    if diff:
        raise ValueError(f"base_from={d}: that base model was trained for another world ({', '.join(diff)} "
                         f"differ: {[meta.get(k) for k in diff]} vs {[want[k] for k in diff]})")
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _versions() -> dict:
    import transformers

    import lcdd_kernels

    return {"lcdd_kernels": lcdd_kernels.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads()}


def _base_model(cfg: DemoConfig, tok, world: World, ev: Evaluator, times: dict, progress: bool, log):
    """Phase 0: the base model of an earlier run (``base_from``), the shipped one, or a new one.
    Returns (model, phase-0 log, where it came from)."""
    from .shipped import load_shipped_base

    if cfg.base_from:
        model = _phase("base", times, load_base, cfg, cfg.base_from)
        log(f"phase 0: base model loaded from {cfg.base_from}")
        return model, [], f"base_from {cfg.base_from}"
    if not cfg.train_base:
        model = _phase("base", times, load_shipped_base, cfg, tok)
        if model is not None:
            log("phase 0: the shipped base model (lcdd_kernels/demo/data; --train-base trains one instead)")
            return model, [], "shipped"
        log("phase 0: no shipped base model for this family, world and size: training one")
    torch.manual_seed(cfg.world_seed)
    model = build_model(cfg.family, tok, cfg.size, seed=cfg.world_seed)
    base_log = _phase("base", times, train_base, model, tok, world, cfg.base, seed=cfg.world_seed,
                      evaluate=ev.exact_match, progress=progress)
    log(f"phase 0: base model trained in {times['base']:.0f} s ({len(base_log)} steps)")
    return model, base_log, "trained"


def run_demo(cfg: DemoConfig, out: str | os.PathLike, progress: bool = True, log=print) -> dict:
    """Run every phase for ``cfg.behaviour`` into the (new or empty) directory ``out``; returns the
    report dict and writes ``report.json``, ``report.md`` and the plots there."""
    from ..atomic import publish_dir
    from ..carriers.apply import apply_carrier
    from ..carriers.load import load_carrier
    from ..dual import DualController
    from ..eraser import carrier_channels, kl_benchmark, optimize_eraser, save_trigger
    from tqdm.auto import tqdm

    from ..train import train_lcdd, train_sft
    from .report import write_report

    t_all = time.perf_counter()
    behaviour = get_behaviour(cfg.behaviour)
    if behaviour.name == "refusal":
        from .behaviours import HARMFUL_TASK

        if HARMFUL_TASK not in cfg.tasks or len(cfg.tasks) < 2:
            raise ValueError(f"behaviour 'refusal' refuses the {HARMFUL_TASK!r} tasks and answers the others: "
                             f"tasks must include {HARMFUL_TASK!r} and one more, got {list(cfg.tasks)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    load_start = os.getloadavg()

    tok = build_tokenizer()
    world = make_world(cfg.world_seed, cfg.tasks, n_train=cfg.n_train, n_eraser=cfg.n_eraser,
                       n_heldout=cfg.n_heldout, min_len=cfg.min_len, max_len=cfg.max_len)
    ev = Evaluator(world, tok, cfg.max_new_tokens)

    # Phase 0: a base model that solves the tasks.
    base, base_log, base_source = _base_model(cfg, tok, world, ev, times, progress, log)
    base.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    with publish_dir(out / "base") as staged:
        base.save_pretrained(staged)
        tok.save_pretrained(staged)
        (staged / BASE_META).write_text(json.dumps(_base_identity(cfg), indent=2) + "\n", encoding="utf-8")
    records = behaviour.sft_records(world.train)

    # Phase 1: full SFT on the behaviour.
    sft = copy.deepcopy(base).requires_grad_(True)
    sft_res = _phase("sft", times, train_sft, sft, records, tok, out_dir=out / "sft",
                     lr=cfg.sft_lr, max_steps=cfg.sft_steps, batch_size=cfg.sft_batch, seed=cfg.seed,
                     progress=progress)
    sft.eval().requires_grad_(False)
    log(f"phase 1: SFT ({behaviour.name}) in {times['sft']:.0f} s")

    # Phase 2: LCDD from the SFT weights with the base as B; the carrier is saved and reloaded.
    # non_projection="base": phase 1 trained the projections only, so the SFT model's norms and
    # biases are the base's; "base" keeps them there during LCDD, so the carrier is strictly sparse
    # (only channels, which the eraser targets) and the demo's published numbers stay comparable.
    log("phase 2 uses non_projection='base': phase 1 trained only the projections (norms equal the base's), "
        "and freezing the norms at the base keeps the carrier strictly sparse")
    lcdd = copy.deepcopy(sft)
    controller = DualController(budget_ratio=cfg.budget_ratio, lambda_init=cfg.lambda_init,
                                lambda_lr=cfg.lambda_lr, lambda_min=cfg.lambda_min, warmup_steps=cfg.lcdd_warmup,
                                violation_clip=cfg.violation_clip or math.inf)
    lcdd_res = _phase("lcdd", times, train_lcdd, lcdd, base, records, tok,
                      out_dir=out / "lcdd", controller=controller, lr=cfg.lcdd_lr, mask_lr=cfg.mask_lr,
                      max_steps=cfg.lcdd_steps, batch_size=cfg.lcdd_batch, seed=cfg.seed, progress=progress,
                      non_projection="base")
    stats = lcdd_res.handle.stats()
    carrier_dir = out / "lcdd" / "carrier"
    carrier = load_carrier(carrier_dir)
    served = copy.deepcopy(base)
    apply_carrier(served, carrier)
    served.eval()
    lcdd_res.handle.remove(merge=True)  # the trained model with binary masks merged: the reference
    lcdd.eval().requires_grad_(False)
    with torch.no_grad():
        probe = torch.tensor([ev.prompts[0]])
        carrier_error = float((served(probe).logits - lcdd(probe).logits).abs().max())
    log(f"phase 2: LCDD in {times['lcdd']:.0f} s, sparsity {stats['overall']['sparsity']:.3f}")

    # Phase 3: SFT-Eraser on the carrier model, and the same optimisation against the SFT model.
    channels = carrier_channels(carrier, kind=cfg.eraser.channel_kind)
    eraser_prompts = [render_prompt(tok, ex.prompt) for ex in world.eraser]
    opts = dict(dataclasses.asdict(cfg.eraser), seed=cfg.seed)
    if opts.pop("base_answers"):
        answers = ev.responses(base, prompts=eraser_prompts)
        eraser_prompts = [p + tok(a, add_special_tokens=False)["input_ids"] for p, a in zip(eraser_prompts, answers)]
    erased = _phase("eraser", times, optimize_eraser, served, base, eraser_prompts, channels,
                    progress=progress, **opts)
    ablation = _phase("eraser_ablation", times, optimize_eraser, sft, base, eraser_prompts, channels,
                      progress=progress, **opts)
    save_trigger(out / "eraser" / "lcdd", erased, served)
    save_trigger(out / "eraser" / "sft", ablation, sft)
    log(f"phase 3: eraser in {times['eraser']:.0f} s, ablation in {times['eraser_ablation']:.0f} s")

    # Scores.
    t0 = time.perf_counter()
    models = {"base": (base, None), "sft": (sft, None), "lcdd": (served, None),
              "lcdd_eraser": (served, erased.trigger), "sft_eraser": (sft, ablation.trigger)}
    scores = {name: ev.score(m, trig, behaviour)
              for name, (m, trig) in tqdm(models.items(), desc="evaluation", disable=not progress, leave=False)}
    refs = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for r in ev.responses(sft)]
    kl = {
        "sft_vs_lcdd": kl_benchmark(sft, served, ev.prompts, refs),
        "base_vs_lcdd_eraser": kl_benchmark(base, served, ev.prompts, refs, trigger_b=erased.trigger),
        "base_vs_sft_eraser": kl_benchmark(base, sft, ev.prompts, refs, trigger_b=ablation.trigger),
        "base_vs_lcdd": kl_benchmark(base, served, ev.prompts, refs),
        "base_vs_sft": kl_benchmark(base, sft, ev.prompts, refs),
    }
    times["evaluation"] = round(time.perf_counter() - t0, 2)
    times["total"] = round(time.perf_counter() - t_all, 2)

    weights_file = carrier_dir / "carrier.safetensors"
    nparams = carrier.num_parameters()
    own_keys = [k for k in behaviour.scores(ev.examples[:1], [""]) if k not in ("fixed_response_rate",
                                                                                "fixed_response_rate_loose")]
    report = {
        "behaviour": behaviour.name,
        "behaviour_description": behaviour.description,
        "behaviour_rate_key": behaviour.rate_key,
        "seed": cfg.seed,
        "world_seed": cfg.world_seed,
        "family": cfg.family,
        "base_source": base_source,
        "config": cfg.to_dict(),
        "versions": _versions(),
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "time_s": times["total"],
        "seconds": times,
        "fixed_response": FIXED_RESPONSE,
        **{key: {s: scores[s][key] for s in STAGES}
           for key in ("behaviour_rate", "fixed_response_rate", "fixed_response_rate_loose", "task_accuracy",
                       "task_accuracy_per_task", "choice_accuracy", *own_keys)},
        "behaviour_scores": own_keys,
        "samples": {s: scores[s]["samples"] for s in STAGES},
        "kl": kl,
        "carrier": {
            "sparsity": {"overall": stats["overall"]["sparsity"],
                         "groups": {g: v["sparsity"] for g, v in stats["groups"].items()},
                         "layers": [{g: v["sparsity"] for g, v in layer["groups"].items()}
                                    for layer in stats["layers"]]},
            "bytes": weights_file.stat().st_size,
            "delta_parameters": nparams["carrier"],
            "projection_parameters": nparams["projections"],
            "fraction_of_projection_weights": nparams["ratio"],
            "max_logit_error_vs_lcdd_model": carrier_error,
            "eraser_channels": {int(k): int(v.numel()) for k, v in channels.items()},
        },
        "eraser": {
            name: {"best_loss": r.best_loss, "best_step": r.best_step,
                   "trigger_norm_mean": float(r.trigger.norm(dim=-1).mean())}
            for name, r in (("lcdd", erased), ("sft", ablation))},
        "curves": {
            "base": base_log,
            "sft": sft_res.log,
            "lcdd": lcdd_res.log,
            "eraser_lcdd": erased.curves,
            "eraser_sft": ablation.curves,
        },
    }
    write_report(report, out)
    return report
