"""``apply_lcdd``: patch a Hugging Face causal LM for LCDD training, and undo it.

What patching does to ``model`` (which holds the SFT weights):

- every q/k/v/o and gate/up/down projection of every decoder layer becomes a masked-delta module
  (:mod:`lcdd_kernels.models.modules`) whose trainable ``weight`` is the SFT weight (the same
  Parameter object) and whose frozen ``base`` is the base model's weight;
- each decoder layer gets ``lcdd_masks``, a HeavisideMask with the eight groups of SPEC §2;
- every other parameter (embeddings, norms, lm_head, projection biases) is handled by the
  ``non_projection`` mode:

  - ``"sft"`` (default, the authors' recipe, SPEC §3): the SFT model's values are kept; norms and
    biases train with the projection weights, embeddings and lm_head stay frozen. With every mask
    on the patched model is the SFT model. Carriers store the non-projection parameters that
    differ from the base as dense parts (d-sized vectors; embeddings / lm_head only if changed).
  - ``"base"`` (strict): they are set to the base model's values and frozen, so a carrier is
    purely sparse (masked projection deltas); what SFT changed there is dropped.

  Either way, the SFT model's non-projection parameters that differ from the base are reported
  on the handle (``handle.differences``: max |Δ| and relative size per name) and in the log,
  with what the mode does with them.

``handle.remove()`` gives back a model of plain ``nn.Linear`` projections with no masks, hooks or
extra attributes, and restores every parameter's ``requires_grad`` flag.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import torch
from torch import nn

from ..masks import HeavisideMask
from .families import (
    GROUPS,
    Dims,
    Family,
    check_projection_shapes,
    decoder_layers,
    get_family,
    get_submodule,
    module_paths,
    sparsity_stats,
)
from .modules import MASKS_ATTR, MaskedDeltaLinear, MaskedDeltaSwiGLU

log = logging.getLogger("lcdd_kernels.models")

#: What ``apply_lcdd(non_projection=...)`` accepts.
NON_PROJECTION_MODES = ("sft", "base")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also when FSDP2 holds it sharded (a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_flat_theta(theta, family: Family, dims: Dims) -> torch.Tensor:
    """θ as a flat tensor of the model's mask count, or a ValueError naming the expected layout."""
    theta = torch.as_tensor(theta)
    n = dims.num_masks
    if theta.dim() != 1 or theta.numel() != n:
        sizes = ", ".join(f"{g} {s}" for g, s in dims.group_sizes().items())
        raise ValueError(
            f"theta has shape {tuple(theta.shape)} but this {family.name} model needs a flat "
            f"vector of {n} mask logits ({dims.num_layers} layers x {dims.masks_per_layer} "
            f"per layer: {sizes}); was it trained on another model?")
    if not torch.is_floating_point(theta) or not bool(torch.isfinite(theta).all()):
        raise ValueError("theta must hold finite floating-point mask logits")
    return theta


class LCDDHandle:
    """What :func:`apply_lcdd` returns. Attributes: ``model``, ``family``, ``dims``,
    ``masks`` (one HeavisideMask per decoder layer; ``masks[i].group("q")``), ``modules``
    (full module path -> :class:`MaskedDeltaLinear`), ``base_name`` (name or path of the base
    model when known), ``non_projection`` (``"sft"`` or ``"base"``), ``differences`` (the SFT
    model's non-projection parameters that differed from the base when patching: name ->
    ``{"max_abs", "relative", "numel"}``, relative = ‖Δ‖ / ‖base‖)."""

    def __init__(self, model: nn.Module, family: Family, dims: Dims, masks: list[HeavisideMask],
                 modules: dict[str, MaskedDeltaLinear], base_name: str | None, flags: dict[str, bool],
                 non_projection: str = "base", differences: dict | None = None,
                 base_values: dict[str, torch.Tensor] | None = None, frozen_changed: tuple[str, ...] = ()):
        self.model, self.family, self.dims = model, family, dims
        self.masks = masks
        self.modules = modules
        self.base_name = base_name
        self.non_projection = non_projection
        self.differences = dict(differences or {})
        self._flags = flags
        self._base_values = dict(base_values or {})  # trainable non-projection params: base value
        self._frozen_changed = tuple(frozen_changed)  # embeddings / lm_head the SFT model changed
        self.removed = False

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.modules)} projections"
        return f"LCDDHandle({self.family.name}, {self.dims.num_layers} layers, {state})"

    def _live(self) -> None:
        if self.removed:
            raise RuntimeError("this LCDD handle was removed; call apply_lcdd again to patch the model")

    # -- masks --------------------------------------------------------------------------------
    def l0(self) -> torch.Tensor:
        """``Σ σ(θ)`` over every mask entry of the model (differentiable)."""
        self._live()
        return torch.stack([m.l0() for m in self.masks]).sum()

    def add_penalty_grad_(self, coef: float) -> None:
        """Add the gradient of ``coef · Σ σ(θ)`` to each θ's ``.grad`` (``coef · σ'(θ)``).

        Adding the penalty's gradient after ``backward`` equals putting it in the loss, and works
        per shard under FSDP2 (the penalty is elementwise in θ, so no all-gather is needed).
        """
        self._live()
        with torch.no_grad():
            for m in self.masks:
                s = torch.sigmoid(m.theta)
                g = s.mul_(1 - s).mul_(coef)
                if m.theta.grad is None:
                    m.theta.grad = g
                else:
                    m.theta.grad.add_(g)

    def flat_theta(self) -> torch.Tensor:
        """All mask logits in the authors' flat layout (layers concatenated, SPEC §2 group order)."""
        self._live()
        return torch.cat([full_tensor(m.theta.detach()).float().cpu() for m in self.masks])

    def set_flat_theta(self, theta: torch.Tensor) -> None:
        """Load logits in the flat layout of :meth:`flat_theta` (e.g. the authors' ``theta``)."""
        self._live()
        theta = check_flat_theta(theta, self.family, self.dims)
        per = self.dims.masks_per_layer
        with torch.no_grad():
            for i, m in enumerate(self.masks):
                m.theta.copy_(theta[i * per:(i + 1) * per].to(m.theta.dtype))

    def active_channels(self) -> list[dict[str, torch.Tensor]]:
        """Per layer, per group: sorted int64 indices of active mask entries (θ > 0)."""
        self._live()
        out = []
        for m in self.masks:
            theta = full_tensor(m.theta.detach()).cpu()
            out.append({g: torch.nonzero(theta[slice(*m.range(g))] > 0).flatten() for g in GROUPS})
        return out

    def stats(self) -> dict:
        """Active count and sparsity per group, per layer and overall (see ``sparsity_stats``).

        Counted on the masks' device with one copy to the host: ``train_lcdd`` logs this every
        optimizer step (``active_channels`` copies every layer's θ and indexes it)."""
        self._live()
        counts = []
        for m in self.masks:
            theta = full_tensor(m.theta.detach())
            counts.append(torch.stack([(theta[slice(*m.range(g))] > 0).sum() for g in GROUPS]))
        per_layer = torch.stack([c.to(counts[0].device) for c in counts]).tolist()
        return sparsity_stats([dict(zip(GROUPS, c)) for c in per_layer], self.dims)

    # -- parameters ---------------------------------------------------------------------------
    def parameters(self) -> dict[str, list[nn.Parameter]]:
        """``{"weights": [W of every projection, then (non_projection="sft") the norm weights and
        projection biases], "masks": [θ of every layer]}`` (the two optimizer groups: AdamW on
        weights, SGD on masks). Everything else in the model is frozen."""
        self._live()
        params = dict(self.model.named_parameters())
        return {"weights": [m.weight for m in self.modules.values()] + [params[n] for n in self._base_values],
                "masks": [m.theta for m in self.masks]}

    def dense_parameters(self) -> dict[str, torch.Tensor]:
        """The non-projection parameters whose current value differs from the base (what a carrier
        stores densely, SPEC §4): in ``"sft"`` mode the norms and biases that differ (SFT changed
        them or LCDD trained them) and the embeddings / lm_head when the SFT model changed them
        (with a warning naming their size); empty in ``"base"`` mode."""
        self._live()
        params = dict(self.model.named_parameters())
        out = {}
        for name, b in self._base_values.items():
            v = full_tensor(params[name].detach())
            if not torch.equal(v, b.to(v.device, v.dtype)):
                out[name] = v
        for name in self._frozen_changed:
            v = full_tensor(params[name].detach())
            log.warning("the carrier stores %s densely (%s, %.3f MiB): the SFT model changed it; train SFT with "
                        "embeddings and lm_head frozen (the authors' recipe) to keep carriers small",
                        name, "x".join(map(str, v.shape)), v.numel() * v.element_size() / 2**20)
            out[name] = v
        return out

    # -- undo ---------------------------------------------------------------------------------
    def remove(self, merge: bool = True) -> nn.Module:
        """Plain ``nn.Linear`` projections again: ``W_eff`` with binary masks merged in
        (``merge=True``) or the raw trained ``W`` (``merge=False``). Returns the model."""
        self._live()
        fam = self.family
        mlp_names = {fam.gate, fam.up, fam.down}
        for layer in decoder_layers(self.model):
            for proj in fam.projections:
                if proj.path not in mlp_names:
                    layer.set_submodule(proj.path, get_submodule(layer, proj.path).to_linear(merge))
            layer.set_submodule(fam.mlp, get_submodule(layer, fam.mlp).restore(merge))
            delattr(layer, MASKS_ATTR)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(name, p.requires_grad))
        self.removed = True
        self.masks, self.modules = [], {}
        return self.model


def _embedding_names(model: nn.Module) -> set[str]:
    """Names of the input embedding and lm_head weights (frozen at their values in both modes)."""
    ids = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None and getattr(mod, "weight", None) is not None:
            ids.add(id(mod.weight))
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _base_state(base, model: nn.Module, fam: Family, dims: Dims) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The base weights by parameter name, checked against the model's names and shapes."""
    if base is model:
        raise ValueError("apply_lcdd: base is the SFT model itself; pass the base (pre-SFT) model or its state dict")
    if isinstance(base, nn.Module):
        try:
            bfam = get_family(base)
        except ValueError as e:
            raise ValueError(f"apply_lcdd: the base model is not supported: {e}") from None
        if bfam.name != fam.name:
            raise ValueError(f"apply_lcdd: the SFT model is a {fam.name} model but the base is a {bfam.name} "
                             "model; LCDD needs the base checkpoint the SFT model was fine-tuned from")
        bdims = Dims.from_config(base)
        if bdims != dims:
            diff = ", ".join(f"{k}: SFT {getattr(dims, k)} vs base {getattr(bdims, k)}"
                             for k in dims.to_dict() if getattr(dims, k) != getattr(bdims, k))
            raise ValueError(f"apply_lcdd: the base model has other dimensions than the SFT model ({diff})")
        name = getattr(base.config, "_name_or_path", None) or None
        state = base.state_dict()
    elif isinstance(base, Mapping):
        name, state = None, base
    else:
        raise TypeError(f"apply_lcdd: base must be a transformers model or its state dict, got {type(base).__name__}")
    missing, wrong = [], []
    for pname, p in model.named_parameters():
        b = state.get(pname)
        if b is None:
            missing.append(pname)
        elif tuple(b.shape) != tuple(p.shape):
            wrong.append(f"{pname}: base {tuple(b.shape)} vs SFT {tuple(p.shape)}")
    if missing:
        raise ValueError(f"apply_lcdd: the base state dict lacks {len(missing)} parameters of the model, e.g. "
                         f"{missing[:3]}; keys must be named as in model.state_dict()")
    if wrong:
        raise ValueError(f"apply_lcdd: the base weights have other shapes than the SFT model's: {wrong[:3]}"
                         f"{' ...' if len(wrong) > 3 else ''}")
    return state, name


def _difference(p: torch.Tensor, b: torch.Tensor) -> dict | None:
    """max |Δ|, ‖Δ‖/‖base‖ and size of one parameter, or None when SFT and base are equal."""
    p = full_tensor(p.detach())
    b = b.detach().to(p.device, p.dtype)
    if torch.equal(p, b):
        return None
    acc = torch.promote_types(p.dtype, torch.float32)
    d = p.to(acc) - b.to(acc)
    nb = float(torch.linalg.vector_norm(b.to(acc)))
    nd = float(torch.linalg.vector_norm(d))
    return {"max_abs": float(d.abs().max()), "relative": nd / nb if nb else math.inf, "numel": p.numel()}


def _log_differences(differences: dict, mode: str, frozen: set[str], trained: dict[str, torch.Tensor]) -> None:
    """Log what ``mode`` does with the non-projection parameters: which differ from the base (and
    by how much), and in "sft" mode how many start training (``trained``: name -> base value)."""
    n_train, v_train = len(trained), sum(t.numel() for t in trained.values())
    if not differences:
        if mode == "sft":
            log.info("apply_lcdd: the SFT model's non-projection parameters equal the base's; non_projection='sft' "
                     "trains its %d norm weights and projection biases (%d values) with the projection weights "
                     "(embeddings and lm_head frozen); pass non_projection='base' to freeze them at the base values",
                     n_train, v_train)
        else:
            log.info("apply_lcdd: the SFT model's non-projection parameters equal the base's (non_projection='base' "
                     "changes no value; they are frozen)")
        return
    worst = sorted(differences.items(), key=lambda kv: -kv[1]["max_abs"])
    listing = ", ".join(f"{n} (max |Δ| {d['max_abs']:.3g}, {d['relative']:.2%} of the base)" for n, d in worst[:4])
    more = f" and {len(worst) - 4} more" if len(worst) > 4 else ""
    if mode == "sft":
        big = [n for n in differences if n in frozen]
        log.info("apply_lcdd(non_projection='sft'): %d non-projection parameters of the SFT model differ from the "
                 "base: %s%s. They keep their SFT values; %d norm weights and projection biases (%d values) train "
                 "with the projection weights%s; carriers store those that differ as dense parts. Pass "
                 "non_projection='base' for strictly sparse carriers.",
                 len(differences), listing, more, n_train, v_train,
                 f"; {', '.join(big)} stay frozen at the SFT values and make carriers large" if big else "")
    else:
        log.warning("apply_lcdd(non_projection='base'): %d non-projection parameters of the SFT model differ from "
                    "the base: %s%s. They are set to the base values and frozen, so the patched model is not the "
                    "SFT model even with every mask on; pass non_projection='sft' to keep them (the authors' "
                    "recipe; carriers then store them as dense parts).", len(differences), listing, more)


def apply_lcdd(model: nn.Module, base, theta: torch.Tensor | None = None, init_mean: float = 1.5,
               init_std: float = 0.5, seed: int | None = None, non_projection: str = "sft") -> LCDDHandle:
    """Patch ``model`` (a transformers causal LM holding the SFT weights) for LCDD training.

    Args:
        model: Llama / Mistral / Qwen2 / Qwen3 causal LM; modified in place.
        base: the base model (same family and shapes) or its state dict (names as in
            ``model.state_dict()``). Its weights are referenced, not copied, when dtype and
            device already match the model's.
        theta: optional flat mask logits (layout of :meth:`LCDDHandle.flat_theta`), e.g. to resume.
        init_mean, init_std: θ ~ N(init_mean, init_std) otherwise (SPEC §2: 1.5, 0.5).
        seed: seed for the θ initialisation (default: the global torch RNG).
        non_projection: ``"sft"`` (default, the authors' recipe): norms, biases, embeddings and
            lm_head keep the SFT model's values; norms and biases train, embeddings and lm_head
            are frozen; carriers store what differs from the base densely. ``"base"`` (strict):
            they are set to the base's values and frozen; carriers are purely sparse. Differences
            are reported either way (``handle.differences`` and the log).

    Returns:
        an :class:`LCDDHandle`; ``handle.remove()`` undoes the patch.
    """
    if non_projection not in NON_PROJECTION_MODES:
        raise ValueError(f"apply_lcdd: non_projection must be 'sft' (keep the SFT model's norms, biases, "
                         f"embeddings and lm_head: the authors' recipe) or 'base' (set them to the base's: strictly "
                         f"sparse carriers), got {non_projection!r}")
    fam = get_family(model)
    dims = Dims.from_config(model)
    layers = decoder_layers(model)
    if any(hasattr(layer, MASKS_ATTR) for layer in layers):
        raise ValueError("apply_lcdd: this model is already patched; call handle.remove() first")
    if len(layers) != dims.num_layers:
        raise ValueError(f"apply_lcdd: the config says {dims.num_layers} layers but the model has {len(layers)}")
    act = getattr(model.config, fam.hidden_act, None)
    if act not in ("silu", "swish"):
        raise ValueError(f"apply_lcdd: the MLP activation is {act!r}; the fused masked-delta SwiGLU needs silu")
    check_projection_shapes(model, dims)
    if theta is not None:
        theta = check_flat_theta(theta, fam, dims)
    state, base_name = _base_state(base, model, fam, dims)

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    proj_weights = {f"{path}.weight" for _, _, path in module_paths(model)}
    frozen = _embedding_names(model)  # frozen in both modes (SPEC §3)
    differences = {n: d for n, p in model.named_parameters() if n not in proj_weights
                   if (d := _difference(p, state[n])) is not None}
    base_values = {}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname in proj_weights:
                p.requires_grad_(True)
            elif non_projection == "base":
                p.copy_(state[pname])  # base value (embeddings, norms, lm_head, biases); frozen
                p.requires_grad_(False)
            elif pname in frozen:
                p.requires_grad_(False)  # the SFT value, frozen
            else:  # a norm weight or projection bias: the SFT value, trained; its base value is kept
                base_values[pname] = state[pname].detach().to(p.device, p.dtype).clone()
                p.requires_grad_(True)
    _log_differences(differences, non_projection, frozen, base_values)

    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    device = next(model.parameters()).device
    mlp_names = {fam.gate, fam.up, fam.down}
    masks: list[HeavisideMask] = []
    modules: dict[str, MaskedDeltaLinear] = {}
    for i, layer in enumerate(layers):
        mask = HeavisideMask(groups=dims.group_sizes(), init_mean=init_mean, init_std=init_std, generator=gen)
        layer.add_module(MASKS_ATTR, mask.to(device))
        masks.append(mask)
        patched = {}
        for proj in fam.projections:
            lin = get_submodule(layer, proj.path)
            path = f"{fam.layers}.{i}.{proj.path}"
            b = state[f"{path}.weight"].detach().to(device=lin.weight.device, dtype=lin.weight.dtype)
            patched[proj.path] = modules[path] = MaskedDeltaLinear(lin, b, mask, proj, dims)
        for path, mod in patched.items():
            if path not in mlp_names:
                layer.set_submodule(path, mod)
        shell = get_submodule(layer, fam.mlp)
        for path in (fam.gate, fam.up, fam.down):
            # The shell keeps no reference to W; None keeps the slot so restore() keeps module order.
            setattr(shell, path.rsplit(".", 1)[-1], None)
        layer.set_submodule(fam.mlp, MaskedDeltaSwiGLU(patched[fam.gate], patched[fam.up], patched[fam.down], shell))

    handle = LCDDHandle(model, fam, dims, masks, modules, base_name, flags, non_projection, differences,
                        base_values, tuple(n for n in differences if n in frozen and non_projection == "sft"))
    if theta is not None:
        handle.set_flat_theta(theta)
    return handle
