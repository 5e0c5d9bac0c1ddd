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

from pathlib import Path

import torch

from .base import build_model, render_prompt, train_base
from .behaviours import get_behaviour
from .config import STAGES, DemoConfig
from .evaluate import Evaluator
from .world import FIXED_RESPONSE, World, build_tokenizer, make_world


def _phase(name, times, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - t0, 2)
    return out


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
    from ..train.data import as_examples
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
    # tokenized once for phases 1 and 2 (each would otherwise render the chat template again)
    records = as_examples(behaviour.sft_records(world.train), tok)

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
