"""Activation capture (SPEC §5): a few channels of each decoder layer's output at one position.

``capture`` registers one forward hook per captured decoder layer. The hook reads the layer's
output hidden state as it comes (a tensor in transformers 5.x; the first element of a tuple in
older releases) and calls :func:`~lcdd_kernels.ops.gather.gather_channels`, one fused kernel that
reads only the B·C elements it returns. Nothing else of the hidden state is kept: memory is
B·C per layer, written into buffers allocated once when no gradient is recorded.

The position per row is found from the attention mask that the model's backbone receives (a
forward pre-hook reads it), so left and right padding both work without the caller doing
anything: "last" is the last column where the mask is 1.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

from .. import _checks
from ..models.families import decoder_layers
from ..ops.gather import gather_channels

__all__ = ["capture", "Capture", "CaptureDone", "carrier_channels", "CHANNEL_KINDS"]

OP = "capture"

#: channel kind -> mask groups of SPEC §2 whose active entries form the per-layer channel set
CHANNEL_KINDS = {
    "write": ("ffn_write", "attn_write"),
    "all_residual": ("ffn_write", "attn_write", "ffn_read", "attn_read"),
    "ffn_write": ("ffn_write",),
    "attn_write": ("attn_write",),
}


class CaptureDone(Exception):
    """Raised by the hook of the last captured layer when ``stop_after_last=True``: the layers
    after it (and the LM head) are never run. :meth:`Capture.forward` catches it."""


def _backbone(model, layers) -> torch.nn.Module:
    """The module that owns ``layers`` and receives the attention mask (``model.model`` for a
    ``*ForCausalLM``; the model itself for a bare backbone)."""
    for module in model.modules():
        if getattr(module, "layers", None) is layers:
            return module
    raise ValueError(f"{OP}: cannot find the module owning the decoder layers of {type(model).__name__}")


def _layer_output(output) -> torch.Tensor:
    # transformers >= 5 returns the hidden state; 4.x returned (hidden_state, *extras).
    return output[0] if isinstance(output, (tuple, list)) else output


def normalize_channels(channels: Mapping[int, object], n_layers: int, hidden_size: int,
                       device: torch.device, op: str = OP) -> dict[int, torch.Tensor]:
    """Validate ``{layer: indices}`` once; returns int64 vectors on ``device``, empty layers dropped.

    Layers must exist (0 ≤ layer < n_layers) and indices lie in [0, hidden_size).
    """
    if not isinstance(channels, Mapping):
        raise TypeError(
            f"{op}: channels must map layer index -> channel indices (e.g. {{3: torch.tensor([5, 9])}}), "
            f"got {type(channels).__name__}; build it from a carrier with carrier_channels()")
    out: dict[int, torch.Tensor] = {}
    for layer, idx in sorted(channels.items(), key=lambda kv: int(kv[0])):
        if isinstance(layer, bool) or not isinstance(layer, int) and not (
                isinstance(layer, torch.Tensor) and layer.numel() == 1):
            raise TypeError(f"{op}: channel dict keys must be layer indices (int), got {layer!r}")
        layer = int(layer)
        if not 0 <= layer < n_layers:
            raise ValueError(
                f"{op}: layer {layer} does not exist; this model has {n_layers} decoder layers "
                f"(valid indices 0..{n_layers - 1})")
        t = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(list(idx))
        if t.numel() == 0:
            continue
        if t.dtype not in _checks.INDEX_DTYPES:
            raise TypeError(f"{op}: channels of layer {layer} must be integer indices, got {t.dtype}")
        t = t.to(device=device, dtype=torch.int64)
        _checks.index_tensor(op, f"channels[{layer}]", t, hidden_size, device,
                             "(a vector of channel indices)")
        out[layer] = t.contiguous()
    return out


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, S) attention mask (any padding side)."""
    n_s = mask.shape[-1]
    return (n_s - 1) - torch.flip(mask != 0, dims=[-1]).int().argmax(dim=-1)


class Capture:
    """What :func:`capture` yields.

    Attributes:
        channels: {layer: (C_l,) int64} validated channel sets (layers with no channel dropped).
        activations: {layer: (B, C_l) tensor} in the model's dtype, filled by each forward.
            With ``grad=False`` these are buffers reused across forwards (copy them to keep one);
            with ``grad=True`` each forward creates fresh tensors attached to the autograd graph.
        positions: (B,) int64, the sequence index gathered per row in the last forward.
    """

    def __init__(self, model, channels, position, grad, stop_after_last):
        self.model = model
        layers = decoder_layers(model)
        self._layers = layers
        self._backbone = _backbone(model, layers)
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{OP}: model.config.hidden_size is missing; pass a Hugging Face causal LM")
        device = next(model.parameters()).device
        self.channels = normalize_channels(channels, len(layers), hidden, device)
        if isinstance(position, str) and position != "last":
            raise ValueError(f"{OP}: position must be 'last', an int or a (batch,) LongTensor, got {position!r}")
        self.position = position
        self.grad = grad
        self.stop_after_last = stop_after_last
        self.activations: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    # -- hooks ---------------------------------------------------------------------------------
    def _on_backbone(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, torch.Tensor) and mask.dim() != 2 and self.position == "last":
            raise ValueError(
                f"{OP}: position='last' needs a 2-D (batch, seq) attention mask, got shape "
                f"{tuple(mask.shape)}; pass explicit positions to capture(..., position=...)")
        self._mask = mask if isinstance(mask, torch.Tensor) else None
        self.positions = None

    def _resolve_positions(self, hidden: torch.Tensor) -> torch.Tensor:
        n_b, n_s = hidden.shape[:2]
        pos = self.position
        if isinstance(pos, str):  # "last"
            if self._mask is None:
                return torch.full((n_b,), n_s - 1, dtype=torch.int64, device=hidden.device)
            return _last_positions(self._mask.to(hidden.device)[:, -n_s:])
        if isinstance(pos, int):
            p = pos + n_s if pos < 0 else pos
            if not 0 <= p < n_s:
                raise ValueError(f"{OP}: position {pos} is outside a sequence of length {n_s}")
            return torch.full((n_b,), p, dtype=torch.int64, device=hidden.device)
        pos = torch.as_tensor(pos, device=hidden.device)
        _checks.index_tensor(OP, "position", pos, n_s, hidden.device, "(batch,): one index per row")
        _checks.shape(OP, "position", pos, (n_b,), "(one sequence index per row of the batch)")
        return pos.long()

    def _on_layer(self, layer: int, last: bool):
        channels = self.channels[layer]

        def hook(module, args, output):
            hidden = _layer_output(output)
            if self.positions is None or self.positions.shape[0] != hidden.shape[0]:
                self.positions = self._resolve_positions(hidden)
            if self.grad:
                self.activations[layer] = gather_channels(hidden, self.positions, channels,
                                                          check_indices=False)
            else:
                buf = self.activations.get(layer)
                shape = (hidden.shape[0], channels.numel())
                if buf is None or buf.shape != shape or buf.dtype != hidden.dtype or buf.device != hidden.device:
                    buf = hidden.new_empty(shape)
                    self.activations[layer] = buf
                with torch.no_grad():
                    gather_channels(hidden, self.positions, channels, out=buf, check_indices=False)
            if last and self.stop_after_last:
                raise CaptureDone

        return hook

    def _attach(self):
        self._handles.append(self._backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True))
        last = max(self.channels) if self.channels else None
        for layer in self.channels:
            self._handles.append(self._layers[layer].register_forward_hook(self._on_layer(layer, layer == last)))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def forward(self, *args, **kwargs):
        """Call the model; returns its output, or None when ``stop_after_last`` cut it short."""
        try:
            return self.model(*args, **kwargs)
        except CaptureDone:
            return None


@contextlib.contextmanager
def capture(model, channels: Mapping[int, object], position="last", grad: bool = False,
            stop_after_last: bool = False) -> Iterator[Capture]:
    """Capture ``channels`` of decoder-layer outputs at one position per row.

    Args:
        model: a Hugging Face causal LM of a supported family (Llama, Mistral, Qwen2, Qwen3).
        channels: {layer index: (C_l,) channel indices}; layers with no channel are skipped.
        position: "last" (each row's last real token, from the attention mask: left or right
            padding; the last column when no mask is given), an int (same column for every row,
            negative counts from the end) or a (B,) LongTensor of explicit positions.
        grad: keep the autograd graph (activations differentiable w.r.t. everything upstream).
        stop_after_last: raise :class:`CaptureDone` after the last captured layer, skipping the
            rest of the model; call the model through ``cap.forward(...)`` which catches it.

    Yields:
        a :class:`Capture`; after each forward ``cap.activations[layer]`` is (B, C_l).

    Example::

        with capture(model, {3: torch.tensor([5, 17])}) as cap:
            model(**tokenizer(texts, return_tensors="pt", padding=True))
        acts = cap.activations[3]  # (batch, 2)
    """
    cap = Capture(model, channels, position, grad, stop_after_last)
    cap._attach()
    try:
        yield cap
    finally:
        cap.remove()


def carrier_channels(carrier_or_handle, kind: str = "write") -> dict[int, torch.Tensor]:
    """Per-layer channel sets of SPEC §5 from a carrier or an ``apply_lcdd`` handle.

    ``kind``: "write" (active ffn_write ∪ attn_write), "all_residual" (adds ffn_read and
    attn_read), "ffn_write" or "attn_write". Returns {layer: sorted unique (C_l,) int64};
    layers with no channel are left out. A ``CarrierHandle`` (from ``apply_carrier``) is read
    through its carrier; an ``LCDDHandle`` from its current binary masks (θ > 0).
    """
    if kind not in CHANNEL_KINDS:
        raise ValueError(f"carrier_channels: kind must be one of {', '.join(CHANNEL_KINDS)}, got {kind!r}")
    source = getattr(carrier_or_handle, "carrier", carrier_or_handle)
    if not callable(getattr(source, "active_channels", None)):
        raise TypeError(
            f"carrier_channels: expected a Carrier (load_carrier), an apply_carrier handle or an "
            f"apply_lcdd handle, got {type(carrier_or_handle).__name__}")
    out = {}
    for layer, groups in enumerate(source.active_channels()):
        idx = torch.unique(torch.cat([groups[g].long().cpu() for g in CHANNEL_KINDS[kind]]))
        if idx.numel():
            out[layer] = idx
    return out
