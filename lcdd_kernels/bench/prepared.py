"""What a suite hands the runner: a :class:`Prepared` provider of one op, the call timed in
each mode, and setup targets named ``"module:function"`` (a memory measurement may rerun one in a
fresh process)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

MODES = ("forward", "backward", "full")
#: Modes whose peak memory is measured (``backward`` needs the forward's graph, so it equals ``full``).
MEMORY_MODES = ("forward", "full")


@dataclass
class Prepared:
    """One provider of one op, ready to run.

    forward: runs one training forward and returns its output tensor.
    params: leaves that receive gradients; their ``.grad`` is reset to None before every call.
    state: every tensor the provider holds (counted once each in ``state_bytes``).
    weight_bytes: one copy of the op's trainable weights, the unit of ``extra_weight_copies``.
    info: extra fields for the result row (e.g. the backend that ran).
    """

    forward: Callable[[], torch.Tensor]
    params: Sequence[torch.Tensor]
    state: Sequence[torch.Tensor]
    weight_bytes: int
    info: dict = field(default_factory=dict)

    def state_bytes(self) -> int:
        seen: dict[int, int] = {}
        for t in self.state:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())


def zero_grads(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def mode_callable(prep: Prepared, mode: str) -> Callable[[], object]:
    """The call timed in ``mode``: ``forward``, ``backward`` (of one kept forward) or ``full``."""
    if mode == "forward":
        return prep.forward
    if mode == "backward":
        y = prep.forward()
        dy = torch.randn_like(y)
        return lambda: y.backward(dy, retain_graph=True)
    if mode == "full":
        dy = None

        def full():
            nonlocal dy
            y = prep.forward()
            dy = torch.randn_like(y) if dy is None else dy
            y.backward(dy)

        return full
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


def resolve(target: str) -> Callable:
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
