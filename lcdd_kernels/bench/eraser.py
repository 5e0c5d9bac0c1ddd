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
* ``capture/<model>`` (mode ``forward``, no grad, batch of 16 padded prompts): ``plain`` (baseline)
  is the model's forward; ``capture`` is the same forward inside :func:`lcdd_kernels.capture`.

Timing: on the CPU the providers of a group run in alternation, and ratios (``cost_vs_baseline``)
and steps/s use the process's CPU time per call, minimum over the repeats: on a machine shared
with other work, wall time measures the neighbours as much as the provider (the wall-time median,
percentiles and minimum are in every row too). On CUDA: ``do_bench`` medians.

Models: ``tiny-32k`` (Llama layout, d 256, 4 layers, 32k vocabulary) and ``qwen3-0.6b`` (the real
dimensions, random weights; GPU only). Channels: a random quarter of d per layer, at every layer
(carriers keep about 16–27% of ``*_write`` entries), L = 20, k = 8, prompts of 24–64 tokens.
"""

from __future__ import annotations

import copy
import gc

import torch
import torch.nn.functional as F

from . import common

SUITE = "eraser"

#: model name -> tiny_config overrides (family first)
MODELS = {
    "tiny-32k": ("llama", dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096)),
}
#: (device type, quick) -> models
PLANS = {("cpu", True): ("tiny-32k",), ("cpu", False): ("tiny-32k",),
         ("cuda", True): ("tiny-32k", "qwen3-0.6b"), ("cuda", False): ("tiny-32k", "qwen3-0.6b")}

N_PROMPTS, BATCH, TRIGGER, TAIL = 64, 16, 20, 8


def build_models(name: str, device: str, dtype: torch.dtype):
    """(lcdd model, base model, prompts, channels): two differently seeded models of one shape."""
    from ..models.tiny import tiny_model

    family, over = MODELS[name]
    models = [tiny_model(family, seed, dtype, device=device, **over).eval().requires_grad_(False) for seed in (1, 0)]
    config = models[0].config
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(24, 65, (N_PROMPTS,), generator=g)
    prompts = [torch.randint(3, config.vocab_size, (int(n),), generator=g) for n in lengths]
    d = config.hidden_size
    channels = {layer: torch.randperm(d, generator=g)[: d // 4].sort().values.to(device)
                for layer in range(config.num_hidden_layers)}
    return models[0], models[1], prompts, channels


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


def prepare(group: str, provider: str, models, kappa: float):
    """(callable timed, cleanup) for one provider of one group."""
    from ..eraser.capture import capture
    from ..eraser.eraser import EraserOptions, EraserRun
    from ..eraser.layout import build_rows

    model, base, prompts, channels = models
    model = copy.deepcopy(model)  # providers are timed in alternation: each keeps its hooks to itself
    if group.startswith("step/"):
        if provider == "published":
            run = PublishedStep(model, base, prompts, channels, kappa, torch.Generator().manual_seed(0))
        else:
            opts = EraserOptions(trigger_length=TRIGGER, tail_k=TAIL, kappa=kappa, batch_size=BATCH)
            run = EraserRun(model, base, prompts, channels, options=opts, progress=False)
        return run.step, run.close
    rows = build_rows(model.get_input_embeddings(), prompts[:BATCH], None)
    ctx = capture(model, channels) if provider == "capture" else None
    if ctx is not None:
        ctx.__enter__()

    def forward():
        with torch.no_grad():
            return model(**rows.model_kwargs()).logits

    return forward, (lambda: ctx.__exit__(None, None, None)) if ctx is not None else (lambda: None)


def cases(models, quick: bool):
    out = []
    for m in models:
        out.append({"group": f"step/{m}", "model": m, "mode": "step", "kappa": 0.7,
                    "providers": ("published", "lcdd"), "baseline": "published"})
        if not quick:
            out.append({"group": f"step/{m}/kappa0", "model": m, "mode": "step", "kappa": 0.0,
                        "providers": ("published", "lcdd"), "baseline": "published"})
        out.append({"group": f"capture/{m}", "model": m, "mode": "forward", "kappa": None,
                    "providers": ("plain", "capture"), "baseline": "plain"})
    return out


def _ratio(g, num: str, den: str):
    a, b = common.call_ms(g.get(num, {})), common.call_ms(g.get(den, {}))
    return a / b if a and b else None


def _applies(prefix, device_type, kappa=None):
    def f(g):
        r = next(iter(g.values()))
        return (r["group"].startswith(prefix) and r["device_type"] == device_type
                and (kappa is None or r.get("kappa") == kappa))
    return f


TARGETS = [
    common.Target("cpu-steps", "CPU, tiny 32k-vocabulary model, batch 16: lcdd steps/s / published >= 1.4",
                  _applies("step/tiny-32k", "cpu", 0.7), lambda g: _ratio(g, "published", "lcdd"), 1.4, ">="),
    common.Target("gpu-steps", "GPU, batch 16: lcdd steps/s / published >= 10",
                  _applies("step/", "cuda", 0.7), lambda g: _ratio(g, "published", "lcdd"), 10.0, ">="),
    common.Target("capture-overhead", "capture adds <= 3% to a forward (capture time / plain <= 1.03)",
                  _applies("capture/", "cpu"), lambda g: _ratio(g, "capture", "plain"), 1.03),
    common.Target("capture-overhead-gpu", "GPU: capture adds <= 3% to a forward",
                  _applies("capture/", "cuda"), lambda g: _ratio(g, "capture", "plain"), 1.03),
]


# --------------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    common.add_common_arguments(p, default_budget=6.0)
    p.add_argument("--models", default=None, help=f"comma list from {', '.join(MODELS)} (default: by device)")


def run(args) -> int:
    from tqdm.auto import tqdm

    if args.plot:
        raise ValueError("lcdd bench eraser draws no plot (three groups: its table is the picture); drop --plot")
    device, dtype = common.resolve_device_dtype(args)
    dev = torch.device(device)
    models = tuple(args.models.split(",")) if args.models else PLANS[(dev.type, bool(args.quick))]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    if dev.type == "cpu" and "qwen3-0.6b" in models:
        print("note: qwen3-0.6b on the CPU takes many minutes per measurement")
    results = common.open_results(args)
    todo = cases(models, args.quick)
    st = common.stamp(dev, dtype)
    print(f"lcdd bench {SUITE}: {len(todo)} groups on {common.device_name(device)}, {dtype}")
    rows: list[dict] = []
    bar = tqdm(total=sum(len(c["providers"]) for c in todo), desc=f"bench {SUITE}", unit="run")
    built = {}
    for case in todo:
        if case["model"] not in built:
            built.clear()
            gc.collect()
            built[case["model"]] = build_models(case["model"], device, dtype)
        fields = {k: v for k, v in case.items() if k not in ("providers", "baseline", "mode")}
        fields.update(batch=BATCH, trigger_length=TRIGGER, tail_k=TAIL)
        bar.set_postfix_str(case["group"])
        measured = {p: {} for p in case["providers"]}
        prepared, cleanups = {}, []
        try:
            for provider in case["providers"]:
                fn, cleanup = prepare(case["group"], provider, built[case["model"]], case["kappa"])
                prepared[provider] = fn
                cleanups.append(cleanup)
            for provider, m in common.time_interleaved(prepared, dev, args.budget).items():
                measured[provider].update(m)
                if case["mode"] == "step":
                    measured[provider]["steps_per_s"] = 1e3 / common.call_ms(m)
            if not args.no_memory:
                for provider, fn in prepared.items():
                    measured[provider]["peak_bytes"] = common.call_peak_bytes(fn, dev)
        except Exception as e:  # one failing group must not lose the run
            for m in measured.values():
                m["error"] = f"{type(e).__name__}: {e}"[:500]
        finally:
            for cleanup in cleanups:
                cleanup()
        for provider in case["providers"]:
            rows.append(common.make_row(SUITE, st, fields, provider, case["mode"], **measured[provider]))
            bar.update()
        group_rows = [r for r in rows if r["group"] == case["group"]]
        common.add_ratios(group_rows, case["baseline"])
        base_row = next(r for r in group_rows if r["provider"] == case["baseline"])
        for r in group_rows:
            r["cost_vs_baseline"] = _ratio({"a": r, "b": base_row}, "a", "b")
        if results is not None:
            results.write(rows)
    bar.close()
    columns = common.COLUMNS[:5] + [
        ("min ms", lambda r: common._f(r.get("ms_min"), "{:.1f}")),
        ("cpu ms (min)", lambda r: common._f(r.get("cpu_ms_min"), "{:.1f}")),
        ("x base", lambda r: common._f(r.get("cost_vs_baseline"), "{:.3f}")),
        ("steps/s", lambda r: common._f(r.get("steps_per_s"), "{:.2f}")),
    ] + common.COLUMNS[6:7] + common.COLUMNS[-1:]
    return common.report(rows, TARGETS, results, columns=columns)
