"""SFT-Eraser: optimisation steps/s, published way vs batched, and forward time with/without capture.

Groups and providers:

* ``step/<model>`` (mode ``step``, one optimisation step of a batch of 16 prompts):
  ``published`` (baseline), the way the paper's code works: one prompt per forward, forward hooks
  that clone each captured layer's full hidden state, logits over every position; the 16 graphs are
  kept, the loss of SPEC §5 is built from them and one backward runs. Its base targets (μ and the
  base tail log-probabilities) are computed once before timing, as ours are: whether the published
  code recomputes the base model per step is not counted in its favour or against it.
  ``lcdd``: :class:`lcdd_kernels.eraser.eraser.EraserRun` ``.step()`` (one padded batch, one gather
  per layer, LM head on the k tail columns only; with κ = 0 the forward stops after the last
  captured layer).
* ``capture/<model>``: the forward with and without capture, the groups of ``lcdd bench gather``
  (:mod:`.gather`), run here too.

Models, channels and timing: :mod:`.decoder`. L = 20, k = 8.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from . import gather
from .command import add_common_arguments, open_results, report, resolve_device_dtype
from .decoder import BATCH, COLUMNS, MODELS, applies, models_for, ratio, run_groups
from .targets import Target

SUITE = "eraser"

TRIGGER, TAIL = 20, 8


# ---------------------------------------------------------------------------- the published way


class PublishedStep:
    """One optimisation step as the paper's code runs it (see the module docstring)."""

    def __init__(self, model, base, prompts, channels, kappa: float, generator: torch.Generator):
        from ..eraser.eraser import EraserOptions, base_targets

        self.model, self.prompts, self.channels, self.kappa = model, prompts, channels, kappa
        self.opts = EraserOptions(trigger_length=TRIGGER, tail_k=TAIL, kappa=kappa, batch_size=BATCH)
        dev = model.get_input_embeddings().weight.device
        self.prompts = [p.to(dev) for p in prompts]
        self.targets = base_targets(base, self.prompts, channels, TAIL, BATCH, need_kl=kappa > 0)
        emb = model.get_input_embeddings().weight
        ids = torch.randint(emb.shape[0], (TRIGGER,), generator=generator).to(dev)
        self.trigger = emb.detach()[ids].float().clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.trigger], lr=self.opts.lr)
        self.generator = generator
        self.hidden: dict[int, torch.Tensor] = {}
        layers = model.model.layers
        self.hooks = [layers[i].register_forward_hook(self._hook(i)) for i in channels]

    def _hook(self, layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            self.hidden[layer] = h.clone()  # the whole (1, S, D) hidden state
        return hook

    def close(self):
        for h in self.hooks:
            h.remove()

    def step(self):
        opts, emb = self.opts, self.model.get_input_embeddings()
        idx = torch.randperm(len(self.prompts), generator=self.generator)[:BATCH]
        acts = {layer: [] for layer in self.channels}
        kls = []
        self.optimizer.zero_grad()
        for i in idx.tolist():  # one prompt per forward
            x = self.prompts[i]
            e = torch.cat([self.trigger.to(emb.weight.dtype), emb(x)])[None]
            logits = self.model(inputs_embeds=e).logits  # every position
            for layer, ch in self.channels.items():
                acts[layer].append(self.hidden[layer][0, -1, ch].float())
            if self.kappa > 0:
                n = x.numel()
                k = min(TAIL, n)
                logp = logits[0, -k:].float().log_softmax(-1)
                base = self.targets.logp[i, TAIL - k:]
                kls.append(F.kl_div(logp, base, log_target=True, reduction="none").sum(-1).mean())
        mse = torch.stack([(torch.stack(a).mean(0) - self.targets.mu[layer]).pow(2).mean()
                           for layer, a in acts.items()]).mean()
        kl = torch.stack(kls).mean() if kls else mse.new_zeros(())
        loss = mse + self.kappa * kl + opts.l2 * self.trigger.pow(2).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([self.trigger], opts.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            norms = self.trigger.norm(dim=-1, keepdim=True)
            self.trigger.mul_((opts.max_norm / norms.clamp(min=1e-12)).clamp(max=1.0))
        return loss.item()


# ---------------------------------------------------------------------------------- providers


def prepare(case: dict, provider: str, models):
    """(callable timed, cleanup) for one provider of one group."""
    if not case["group"].startswith("step/"):
        return gather.prepare(case, provider, models)
    from ..eraser.eraser import EraserOptions, EraserRun

    model, base, prompts, channels = models
    model = copy.deepcopy(model)  # providers are timed in alternation: each keeps its hooks to itself
    kappa = case["kappa"]
    if provider == "published":
        run = PublishedStep(model, base, prompts, channels, kappa, torch.Generator().manual_seed(0))
    else:
        opts = EraserOptions(trigger_length=TRIGGER, tail_k=TAIL, kappa=kappa, batch_size=BATCH)
        run = EraserRun(model, base, prompts, channels, options=opts, progress=False)
    return run.step, run.close


def cases(models, quick: bool):
    out = []
    for m in models:
        out.append({"group": f"step/{m}", "model": m, "mode": "step", "kappa": 0.7,
                    "providers": ("published", "lcdd"), "baseline": "published"})
        if not quick:
            out.append({"group": f"step/{m}/kappa0", "model": m, "mode": "step", "kappa": 0.0,
                        "providers": ("published", "lcdd"), "baseline": "published"})
        out += gather.cases([m])
    return out


TARGETS = [
    Target("cpu-steps", "CPU, tiny 32k-vocabulary model, batch 16: lcdd steps/s / published >= 1.4",
           applies("step/tiny-32k", "cpu", 0.7), lambda g: ratio(g, "published", "lcdd"), 1.4, ">="),
    Target("gpu-steps", "GPU, batch 16: lcdd steps/s / published >= 10",
           applies("step/", "cuda", 0.7), lambda g: ratio(g, "published", "lcdd"), 10.0, ">="),
] + gather.TARGETS


# --------------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    add_common_arguments(p, default_budget=6.0)
    p.add_argument("--models", default=None, help=f"comma list from {', '.join(MODELS)} (default: by device)")


def run(args) -> int:
    if args.plot:
        raise ValueError("lcdd bench eraser draws no plot (three groups: its table is the picture); drop --plot")
    device, dtype = resolve_device_dtype(args)
    models = models_for(args, device)
    results = open_results(args)
    rows = run_groups(SUITE, cases(models, args.quick), prepare, device, dtype, args.budget, not args.no_memory,
                      results, fields={"batch": BATCH, "trigger_length": TRIGGER, "tail_k": TAIL})
    return report(rows, TARGETS, results, columns=COLUMNS)
