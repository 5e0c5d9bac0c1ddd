"""``apply_lcdd``: patch a Hugging Face causal LM for LCDD training, and undo it.

What patching does to ``model`` (which holds the SFT weights):

- every q/k/v/o and gate/up/down projection of every decoder layer becomes a masked-delta module
  (:mod:`lcdd_kernels.models.modules`) whose trainable ``weight`` is the SFT weight (the same
  Parameter object) and whose frozen ``base`` is the base model's weight;
- each decoder layer gets ``lcdd_masks``, a HeavisideMask with the eight groups of SPEC §2;
- every other parameter (embeddings, norms, lm_head, projection biases) is set to the base model's
  value and frozen. That is what makes the carrier (masked projection deltas, SPEC §4) applied to
  the base model compute exactly the LCDD model.

``handle.remove()`` gives back a model of plain ``nn.Linear`` projections with no masks, hooks or
extra attributes, and restores every parameter's ``requires_grad`` flag.
"""

from __future__ import annotations

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
    model when known)."""

    def __init__(self, model: nn.Module, family: Family, dims: Dims, masks: list[HeavisideMask],
                 modules: dict[str, MaskedDeltaLinear], base_name: str | None, flags: dict[str, bool]):
        self.model, self.family, self.dims = model, family, dims
        self.masks = masks
        self.modules = modules
        self.base_name = base_name
        self._flags = flags
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
        """``{"weights": [W of every projection], "masks": [θ of every layer]}`` (the two optimizer
        groups: AdamW on weights, SGD on masks). Everything else in the model is frozen."""
        self._live()
        return {"weights": [m.weight for m in self.modules.values()],
                "masks": [m.theta for m in self.masks]}

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


def apply_lcdd(model: nn.Module, base, theta: torch.Tensor | None = None, init_mean: float = 1.5,
               init_std: float = 0.5, seed: int | None = None) -> LCDDHandle:
    """Patch ``model`` (a transformers causal LM holding the SFT weights) for LCDD training.

    Args:
        model: Llama / Mistral / Qwen2 / Qwen3 causal LM; modified in place.
        base: the base model (same family and shapes) or its state dict (names as in
            ``model.state_dict()``). Its weights are referenced, not copied, when dtype and
            device already match the model's.
        theta: optional flat mask logits (layout of :meth:`LCDDHandle.flat_theta`), e.g. to resume.
        init_mean, init_std: θ ~ N(init_mean, init_std) otherwise (SPEC §2: 1.5, 0.5).
        seed: seed for the θ initialisation (default: the global torch RNG).

    Returns:
        an :class:`LCDDHandle`; ``handle.remove()`` undoes the patch.
    """
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
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname not in proj_weights:
                p.copy_(state[pname])  # base value (embeddings, norms, lm_head, biases); frozen
            p.requires_grad_(pname in proj_weights)

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

    handle = LCDDHandle(model, fam, dims, masks, modules, base_name, flags)
    if theta is not None:
        handle.set_flat_theta(theta)
    return handle
