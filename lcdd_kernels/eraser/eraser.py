"""SFT-Eraser (SPEC §5): a soft prompt that makes the LCDD model's carrier channels look like the base
model's, optimised in batches.

Per step, for a batch of B prompts x_b and the trigger T (L × D):

    loss = mean_ℓ MSE(mean_b a_ℓ(LCDD, T ⊕ x_b), μ_ℓ)
         + κ · mean_b [ mean over the last k prompt positions of KL(p_base(x_b) ‖ p_LCDD(T ⊕ x_b)) ]
         + l2 · mean_t ‖T_t‖²

where a_ℓ is decoder layer ℓ's output at the prompt's last token on the channels S_ℓ, and μ_ℓ the
mean of a_ℓ(base, x) over all eraser prompts. What makes it fast, with the same numbers as one
prompt at a time (tests/eraser/test_eraser.py checks loss and gradient):

* one forward per step over the whole batch (left padding, then the trigger, then the prompt, with
  position ids starting at the trigger), channels captured by one gather per layer;
* the LM head only on the k tail columns (``logits_to_keep``): with left padding every prompt ends
  in the last column, so the tail is the same k columns for every row;
* base targets (μ and the base tail log-probabilities) computed once, batched, without grad;
* with κ = 0 the forward stops after the last captured layer;
* gradients only for the trigger (``torch.autograd.grad``), never for the model's weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from .capture import CHANNEL_KINDS, capture, carrier_channels, normalize_channels
from .layout import build_rows, token_lists

__all__ = ["EraserOptions", "EraserResult", "BaseTargets", "optimize_eraser", "base_targets",
           "eraser_loss", "random_channels_like", "tail_logprobs", "EraserRun"]

OP = "optimize_eraser"


@dataclass
class EraserOptions:
    """Every knob of SPEC §5, with the paper's defaults.

    trigger_length: L, soft-prompt vectors. kappa: κ, weight of the tail KL. tail_k: k, prompt
    positions the KL averages over. l2: weight of mean ‖T_t‖². lr: Adam learning rate. steps:
    optimisation steps. batch_size: prompts per step (sampled without replacement each step).
    grad_clip: gradient-norm clip (None: off). max_norm: radius each trigger vector is projected
    back into after every step (None: off). channel_kind: "write" | "all_residual" | "ffn_write" |
    "attn_write", used when channels come from a carrier or handle. random_channels: ablation,
    replace each layer's channels by as many random ones. kl_only: ablation, drop the activation
    term. seed: trigger initialisation, batch sampling and random channels.
    """

    trigger_length: int = 20
    kappa: float = 0.7
    tail_k: int = 8
    l2: float = 0.1
    lr: float = 3e-3
    steps: int = 2000
    batch_size: int = 16
    grad_clip: float | None = 1.0
    max_norm: float | None = 1.0
    channel_kind: str = "write"
    random_channels: bool = False
    kl_only: bool = False
    seed: int = 0

    def validate(self) -> "EraserOptions":
        positive = {"trigger_length": self.trigger_length, "tail_k": self.tail_k,
                    "batch_size": self.batch_size, "lr": self.lr}
        for name, v in positive.items():
            if not v > 0:
                raise ValueError(f"{OP}: {name} must be > 0, got {v}")
        for name in ("kappa", "l2", "steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{OP}: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("grad_clip", "max_norm"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{OP}: {name} must be > 0 or None (off), got {v}")
        if self.channel_kind not in CHANNEL_KINDS:
            raise ValueError(f"{OP}: channel_kind must be one of {', '.join(CHANNEL_KINDS)}, "
                             f"got {self.channel_kind!r}")
        if self.kl_only and self.kappa == 0:
            raise ValueError(f"{OP}: kl_only=True with kappa=0 leaves nothing to optimise; set kappa > 0")
        return self


@dataclass
class BaseTargets:
    """What the base model contributes, computed once.

    mu: {layer: (C_l,) float32} mean activation over all prompts (empty when not needed).
    logp: (N, k, V) float32 base log-probabilities at each prompt's last k positions (zero where
        a prompt has fewer than k tokens), or None when κ = 0.
    """

    mu: dict[int, torch.Tensor]
    logp: torch.Tensor | None


@dataclass
class EraserResult:
    """trigger: (L, D) float32 on the CPU, the lowest-loss trigger seen. curves: per step
    "loss", "mse", "kl", "l2" (the loss at the trigger before that step's update)."""

    trigger: torch.Tensor
    best_loss: float
    best_step: int
    curves: dict[str, list[float]]
    channels: dict[int, torch.Tensor]
    channels_kind: str
    options: EraserOptions = field(default_factory=EraserOptions)


# ---------------------------------------------------------------------------------------------


def wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64): losses and log-softmax are never run in 16 bits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def random_channels_like(channels: Mapping[int, torch.Tensor], hidden_size: int,
                         generator: torch.Generator) -> dict[int, torch.Tensor]:
    """The random-channel ablation: per layer, as many channels as ``channels`` has, drawn
    uniformly without replacement from [0, hidden_size), sorted."""
    out = {}
    for layer, idx in channels.items():
        pick = torch.randperm(hidden_size, generator=generator)[: idx.numel()]
        out[layer] = pick.sort().values.to(idx.device)
    return out


def tail_logprobs(model, rows, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at each row's last k tokens, LM head on those columns only.

    ``rows`` must be left-padded (every row ends in the last column). Returns (B, k, V) float32
    and a (B, k) bool mask, False at columns before a row's first token (rows shorter than k).
    """
    n_s = rows.inputs_embeds.shape[1]
    keep = min(k, n_s)
    logits = model(**rows.model_kwargs(), logits_to_keep=keep).logits
    logp = wide(logits).log_softmax(-1)
    if keep < k:
        logp = F.pad(logp, (0, 0, k - keep, 0))
    mask = torch.arange(k, device=logp.device)[None, :] >= (k - rows.lengths[:, None])
    return logp, mask


@torch.no_grad()
def base_targets(base_model, seqs: list[torch.Tensor], channels: Mapping[int, torch.Tensor],
                 tail_k: int, batch_size: int, need_kl: bool = True, progress: bool = False) -> BaseTargets:
    """μ_ℓ and the base tail log-probabilities over all prompts, in batches, without grad."""
    from tqdm.auto import tqdm

    emb = base_model.get_input_embeddings()
    sums = {layer: None for layer in channels}
    logps = []
    with capture(base_model, channels, stop_after_last=not need_kl) as cap:
        for s in tqdm(range(0, len(seqs), batch_size), desc="base targets", disable=not progress):
            rows = build_rows(emb, seqs[s:s + batch_size], None)
            if need_kl:
                logp, mask = tail_logprobs(base_model, rows, tail_k)
                logps.append(logp.masked_fill(~mask[..., None], 0.0))
            elif channels:
                cap.forward(**rows.model_kwargs())
            for layer in channels:
                part = wide(cap.activations[layer]).sum(0)
                sums[layer] = part if sums[layer] is None else sums[layer] + part
    mu = {layer: v / len(seqs) for layer, v in sums.items()}
    return BaseTargets(mu, torch.cat(logps) if need_kl else None)


def eraser_loss(model, trigger: torch.Tensor, seqs: list[torch.Tensor], idx: torch.Tensor,
                targets: BaseTargets, channels: Mapping[int, torch.Tensor], opts: EraserOptions,
                _cap=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The batched loss of SPEC §5 for the prompts ``seqs[i] for i in idx`` (one forward).

    Returns the scalar loss (differentiable w.r.t. ``trigger``) and its parts as floats.
    """
    if _cap is None:  # a standalone call: capture for this one forward
        with capture(model, channels, grad=True, stop_after_last=opts.kappa == 0) as cap:
            return eraser_loss(model, trigger, seqs, idx, targets, channels, opts, _cap=cap)
    rows = build_rows(model.get_input_embeddings(), [seqs[i] for i in idx.tolist()], trigger)
    zero = wide(trigger.new_zeros(()))
    if opts.kappa > 0:
        logp, mask = tail_logprobs(model, rows, opts.tail_k)
        base = targets.logp[idx].to(logp.device)
        kl_pos = F.kl_div(logp, base, log_target=True, reduction="none").sum(-1)  # (B, k)
        # where, not a product: positions outside the prompt must not leak even a non-finite value
        kl = (torch.where(mask, kl_pos, 0.0).sum(1) / mask.sum(1)).mean()
    else:
        _cap.forward(**rows.model_kwargs())
        kl = zero
    if opts.kl_only or not channels:
        mse = zero
    else:
        mse = torch.stack([
            (wide(_cap.activations[layer]).mean(0) - targets.mu[layer].to(trigger.device)).pow(2).mean()
            for layer in channels]).mean()
    l2 = wide(trigger).pow(2).sum(-1).mean()
    loss = mse + opts.kappa * kl + opts.l2 * l2
    parts = torch.stack([t.detach().to(loss.dtype) for t in (loss, mse, kl, l2)]).tolist()  # one sync
    return loss, dict(zip(("loss", "mse", "kl", "l2"), parts))


# ---------------------------------------------------------------------------------------------


def _check_models(model, base_model) -> None:
    from ..models.families import get_family

    for name, m in (("model", model), ("base_model", base_model)):
        if not hasattr(m, "get_input_embeddings") or not hasattr(m, "config"):
            raise TypeError(f"{OP}: {name} must be a Hugging Face causal LM, got {type(m).__name__}")
        get_family(m)
    for attr in ("vocab_size", "hidden_size", "num_hidden_layers"):
        a, b = getattr(model.config, attr, None), getattr(base_model.config, attr, None)
        if a != b:
            raise ValueError(f"{OP}: model and base_model differ in {attr} ({a} vs {b}); the base "
                             f"model must be the one the LCDD model was fine-tuned from")


class EraserRun:
    """One optimisation in progress: prompts, channels, base targets, trigger and Adam.

    :func:`optimize_eraser` drives it; ``step()`` is also what ``lcdd bench eraser`` times.
    """

    def __init__(self, model, base_model, prompts, channels, tokenizer=None,
                 options: EraserOptions | None = None, progress: bool = True):
        self.opts = opts = (options or EraserOptions()).validate()
        _check_models(model, base_model)
        self.model = model
        self.seqs = token_lists(OP, prompts, tokenizer)
        cfg = model.config
        device = model.get_input_embeddings().weight.device
        self.generator = torch.Generator().manual_seed(opts.seed)
        if isinstance(channels, Mapping):
            self.channels_kind = "explicit"
        else:
            channels = carrier_channels(channels, kind=opts.channel_kind)
            self.channels_kind = opts.channel_kind
        channels = normalize_channels(channels, cfg.num_hidden_layers, cfg.hidden_size, device, OP)
        if opts.random_channels:
            channels = random_channels_like(channels, cfg.hidden_size, self.generator)
            self.channels_kind += "+random"
        if opts.kl_only:
            channels = {}
        elif not channels:
            raise ValueError(f"{OP}: no layer has a channel to match; check the carrier (or pass "
                             f"kl_only=True for the KL-only ablation)")
        self.channels = channels
        self.targets = base_targets(base_model, self.seqs, channels, opts.tail_k, opts.batch_size,
                                    need_kl=opts.kappa > 0, progress=progress)
        emb = model.get_input_embeddings().weight
        init_ids = torch.randint(emb.shape[0], (opts.trigger_length,), generator=self.generator)
        dtype = torch.promote_types(emb.dtype, torch.float32)
        self.trigger = emb.detach()[init_ids.to(emb.device)].to(dtype).clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.trigger], lr=opts.lr)
        self.step_index = 0
        self.best_loss, self.best_step = math.inf, -1
        self.best_trigger = self.trigger.detach().clone()
        self.curves: dict[str, list[float]] = {"loss": [], "mse": [], "kl": [], "l2": []}
        self._capture = capture(model, channels, grad=True, stop_after_last=opts.kappa == 0)
        self._cap = self._capture.__enter__()

    def close(self) -> None:
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def step(self) -> dict[str, float]:
        opts, n = self.opts, len(self.seqs)
        idx = torch.randperm(n, generator=self.generator)[: min(opts.batch_size, n)]
        loss, parts = eraser_loss(self.model, self.trigger, self.seqs, idx, self.targets, self.channels,
                                  opts, _cap=self._cap)
        (grad,) = torch.autograd.grad(loss, [self.trigger])
        if parts["loss"] < self.best_loss:  # the trigger this loss was measured at
            self.best_loss, self.best_step = parts["loss"], self.step_index
            self.best_trigger.copy_(self.trigger.detach())
        self.trigger.grad = grad
        if opts.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([self.trigger], opts.grad_clip)
        self.optimizer.step()
        if opts.max_norm is not None:
            with torch.no_grad():
                norms = self.trigger.norm(dim=-1, keepdim=True)
                self.trigger.mul_((opts.max_norm / norms.clamp(min=1e-12)).clamp(max=1.0))
        for key, v in parts.items():
            self.curves[key].append(v)
        self.step_index += 1
        return parts

    def result(self) -> EraserResult:
        return EraserResult(
            trigger=self.best_trigger.detach().float().cpu(), best_loss=self.best_loss,
            best_step=self.best_step, curves=self.curves,
            channels={k: v.cpu() for k, v in self.channels.items()}, channels_kind=self.channels_kind,
            options=dataclasses.replace(self.opts))


def optimize_eraser(model, base_model, prompts, channels, *, tokenizer=None,
                    options: EraserOptions | None = None, progress: bool = True, **overrides) -> EraserResult:
    """Optimise an SFT-Eraser trigger (SPEC §5).

    Args:
        model: the LCDD model (a causal LM with the carrier on) whose behaviour is to be reversed.
        base_model: the model before SFT (same family, vocabulary and dimensions).
        prompts: eraser prompts: strings (with ``tokenizer``) or token-id lists; the paper uses 200.
        channels: {layer: channel indices}, or a carrier / ``apply_lcdd`` handle from which the
            ``channel_kind`` channels are read (:func:`carrier_channels`).
        options: an :class:`EraserOptions`; keyword ``overrides`` replace its fields, e.g.
            ``steps=500, kappa=0.0, random_channels=True``.
        progress: show tqdm bars (base targets, then the steps with the loss).

    Returns:
        an :class:`EraserResult` with the lowest-loss trigger, its loss and step, and the curves.
    """
    opts = options or EraserOptions()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(EraserOptions)}
    if unknown:
        raise TypeError(f"{OP}: unknown option(s) {', '.join(sorted(unknown))}; the options are "
                        f"{', '.join(f.name for f in dataclasses.fields(EraserOptions))}")
    opts = dataclasses.replace(opts, **overrides)
    from tqdm.auto import tqdm

    run = EraserRun(model, base_model, prompts, channels, tokenizer, opts, progress)
    try:
        bar = tqdm(range(opts.steps), desc="eraser", unit="step", disable=not progress)
        for _ in bar:
            parts = run.step()
            bar.set_postfix(loss=f"{parts['loss']:.4f}", best=f"{run.best_loss:.4f}", refresh=False)
    finally:
        run.close()
    return run.result()
