"""Channel gather: a decoder's forward with and without activation capture (plain vs capture).

The op is :func:`lcdd_kernels.ops.gather.gather_channels`, measured where it runs.

Group ``capture/<model>`` (mode ``forward``, no grad, a batch of 16 padded prompts): ``plain``
(baseline) is the model's forward; ``capture`` is the same forward inside
:func:`lcdd_kernels.capture`, which gathers the captured channels of every layer with one
``gather_channels`` call per layer. Models, channels and timing: :mod:`.decoder`.

``lcdd bench gather`` runs these groups alone; ``lcdd bench eraser`` runs them next to its
whole-step groups.
"""

from __future__ import annotations

import copy

import torch

from .command import add_common_arguments, open_results, report, resolve_device_dtype
from .decoder import BATCH, COLUMNS, applies, models_for, ratio, run_groups
from .targets import Target

SUITE = "gather"


def prepare(case: dict, provider: str, models):
    """(callable timed, cleanup) for one provider of a ``capture/`` group."""
    from ..eraser.capture import capture
    from ..eraser.layout import build_rows

    model, _, prompts, channels = models
    model = copy.deepcopy(model)  # providers are timed in alternation: each keeps its hooks to itself
    rows = build_rows(model.get_input_embeddings(), prompts[:BATCH], None)
    ctx = capture(model, channels) if provider == "capture" else None
    if ctx is not None:
        ctx.__enter__()

    def forward():
        with torch.no_grad():
            return model(**rows.model_kwargs()).logits

    return forward, (lambda: ctx.__exit__(None, None, None)) if ctx is not None else (lambda: None)


def cases(models) -> list[dict]:
    return [{"group": f"capture/{m}", "model": m, "mode": "forward", "kappa": None,
             "providers": ("plain", "capture"), "baseline": "plain"} for m in models]


TARGETS = [
    Target("capture-overhead", "capture adds <= 3% to a forward (capture time / plain <= 1.03)",
           applies("capture/", "cpu"), lambda g: ratio(g, "capture", "plain"), 1.03),
    Target("capture-overhead-gpu", "GPU: capture adds <= 3% to a forward",
           applies("capture/", "cuda"), lambda g: ratio(g, "capture", "plain"), 1.03),
]


def add_arguments(p) -> None:
    add_common_arguments(p, default_budget=6.0)
    p.add_argument("--models", default=None, help="comma list from tiny-32k, qwen3-0.6b (default: by device)")


def run(args) -> int:
    if args.plot:
        raise ValueError(f"lcdd bench {SUITE} draws no plot (its table is the picture); drop --plot")
    device, dtype = resolve_device_dtype(args)
    models = models_for(args, device)
    results = open_results(args)
    rows = run_groups(SUITE, cases(models), prepare, device, dtype, args.budget, not args.no_memory, results,
                      fields={"batch": BATCH})
    return report(rows, TARGETS, results, columns=COLUMNS)
