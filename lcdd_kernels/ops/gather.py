"""Channel gather for activation capture (SPEC §5): ``out[b, c] = hidden[b, positions[b], channels[c]]``.

One kernel reads only the B·C elements it returns, from any strided (B, S, D) hidden state, and
writes them into a (B, C) buffer the caller may allocate once (``out=``). Backends: ``triton``
(CUDA tensors), ``cpp`` (CPU tensors, through ``lcdd_kernels._C``), ``torch`` / ``reference``
(advanced indexing). Backward is the same for all of them: the gradient scattered (accumulating
over repeated channels) into a zero (B, S, D) tensor, by PyTorch's ``index_put_``. The registered
ops are ``torch.ops.lcdd.gather_channels`` and ``torch.ops.lcdd.gather_channels_out`` (``out=``).
"""

from __future__ import annotations

import torch

from .. import _backend, _checks
from . import _native

__all__ = ["gather_channels", "gather_channels_ref"]

_IMPLEMENTED = ("triton", "cpp", "torch", "reference")
_AUTO = ("triton", "cpp", "torch")


def gather_channels_ref(hidden, positions, channels):
    """Reference: advanced indexing, (B, S, D), (B,), (C,) -> (B, C)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows[:, None], positions[:, None], channels[None, :]]


def _forward_into(name, out, hidden, positions, channels):
    if out.numel() == 0:
        return out
    if name == "triton":
        from . import gather_triton

        gather_triton.gather_channels_into(out, hidden, positions, channels)
    elif name == "cpp":
        _native.lib().gather_channels_cpu(
            _native.ptr(hidden), _native.DTYPE[hidden.dtype], *hidden.shape, *hidden.stride(),
            _native.ptr(positions), _native.ptr(channels), _native.INDEX[channels.dtype],
            channels.numel(), _native.ptr(out), *out.stride(),
        )
    else:
        out.copy_(gather_channels_ref(hidden, positions, channels))
    return out


# Registered ops: torch.ops.lcdd.gather_channels (a new (B, C) result, differentiable in hidden)
# and torch.ops.lcdd.gather_channels_out (into a caller's buffer, no gradient).


@torch.library.custom_op("lcdd::gather_channels", mutates_args=(), device_types=("cpu", "cuda"))
def _op_gather(hidden: torch.Tensor, positions: torch.Tensor, channels: torch.Tensor, backend: str) -> torch.Tensor:
    """positions (B,) int64, channels (C,) contiguous int32/int64, checked already. One
    implementation for both devices: ``backend`` picks the code (CUDA: the Triton gather; CPU:
    the C++ gather of ``_C``; either: torch)."""
    return _forward_into(backend, hidden.new_empty(hidden.shape[0], channels.numel()), hidden, positions, channels)


@_op_gather.register_fake
def _(hidden, positions, channels, backend):
    return hidden.new_empty(hidden.shape[0], channels.shape[0])


def _gather_setup(ctx, inputs, output):
    hidden, positions, channels, backend = inputs
    ctx.save_for_backward(positions, channels)
    ctx.shape = hidden.shape


def _gather_grad(ctx, grad):
    positions, channels = ctx.saved_tensors
    rows = torch.arange(ctx.shape[0], device=grad.device)
    gh = grad.new_zeros(ctx.shape)
    gh.index_put_((rows[:, None], positions[:, None], channels[None, :]), grad, accumulate=True)
    return gh, None, None, None


_op_gather.register_autograd(_gather_grad, setup_context=_gather_setup)


@torch.library.custom_op("lcdd::gather_channels_out", mutates_args=("out",), device_types=("cpu", "cuda"))
def _op_gather_out(hidden: torch.Tensor, positions: torch.Tensor, channels: torch.Tensor, out: torch.Tensor,
                   backend: str) -> None:
    """The same gather into ``out`` (B, C), any strides."""
    _forward_into(backend, out, hidden, positions, channels)


@_op_gather_out.register_fake
def _(hidden, positions, channels, out, backend):
    return None


def _check(op, hidden, positions, channels, out, check_indices):
    _checks.floating(op, "hidden", hidden)
    _checks.ndim(op, "hidden", hidden, 3, "(batch, seq, dim)")
    n_b, n_s, n_d = hidden.shape
    for name, t, upper, meaning in (("positions", positions, n_s, "(batch,): one sequence index per row"),
                                    ("channels", channels, n_d, "(n_channels,): channel indices")):
        _checks.index_tensor(op, name, t, upper if check_indices else None, hidden.device, meaning)
    _checks.shape(op, "positions", positions, (n_b,), "(one sequence index per row of hidden)")
    if out is not None:
        _checks.tensor(op, "out", out)
        _checks.shape(op, "out", out, (n_b, channels.numel()), "(batch, n_channels)")
        _checks.same_dtype(op, "hidden", hidden, out=out)
        _checks.same_device(op, "hidden", hidden, out=out)


def gather_channels(hidden, positions, channels, out=None, *, backend=None, check_indices=True):
    """Gather a few channels of one position per row: ``hidden[b, positions[b], channels]``.

    Args:
        hidden: (B, S, D) float tensor, any strides (a layer's output as it comes, no copy).
        positions: (B,) int64 (or int32) sequence index per row, in [0, S).
        channels: (C,) int32/int64 channel indices in [0, D); any order, repeats allowed.
        out: optional preallocated (B, C) tensor of hidden's dtype and device, any strides, filled
            in place and returned. Only when no gradient is recorded (hidden does not require grad
            or grad mode is off): an autograd output cannot live in a caller's buffer.
        backend: "triton", "cpp", "torch" or "reference"; default from ``LCDD_BACKEND`` / device.
        check_indices: range-check positions and channels (one host sync each on a GPU). Pass
            False only for indices already checked, e.g. channels validated once at setup;
            out-of-range indices are then undefined behaviour on a GPU.

    Returns:
        (B, C) tensor of hidden's dtype, differentiable in hidden (the gradient is scattered
        into a zero (B, S, D) tensor, accumulating over repeated channels).
    """
    op = "gather_channels"
    # index range checks read the indices (host syncs): eager only
    _check(op, hidden, positions, channels, out, check_indices and not torch.compiler.is_compiling())
    name = _backend.select(op, hidden.device, _IMPLEMENTED, _AUTO, backend)
    if positions.dtype != torch.int64:
        positions = positions.long()
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    if needs_grad and out is not None:
        raise ValueError(
            f"{op}: out= cannot hold a result that requires grad (hidden requires grad and grad "
            f"mode is on); drop out= when capturing with gradients, or run under torch.no_grad()"
        )
    if name == "reference":
        res = gather_channels_ref(hidden, positions, channels)
        return res if out is None else out.copy_(res)
    if name != "torch":  # the kernels take raw strides: contiguous index vectors only
        positions, channels = positions.contiguous(), channels.contiguous()
    if out is None:
        return torch.ops.lcdd.gather_channels(hidden, positions, channels, name)
    torch.ops.lcdd.gather_channels_out(hidden.detach(), positions, channels, out, name)
    return out
