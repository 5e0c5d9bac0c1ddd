"""The one place that picks a backend for an op.

Order of precedence: an explicit ``backend=`` argument, then :func:`use_backend` /
:func:`set_backend` in code, then the ``LCDD_BACKEND`` environment variable, then the automatic
choice by device. Importing this module never touches a GPU, Triton or the compiled extension.

Under ``torch.compile`` the choice is made while Dynamo traces the op's Python wrapper and is
passed to the registered op (``torch.ops.lcdd.*``) as a string argument, so the compiled graph
holds no backend logic. Dynamo guards on :func:`use_backend` / :func:`set_backend` (a thread-local
and a module global): changing them recompiles once. ``LCDD_BACKEND`` is read when a graph is
traced and is not guarded: set it before the first compiled call (or ``torch._dynamo.reset()``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Sequence

import torch

#: Every backend name the package knows. Each op says which of them it implements.
KNOWN = ("triton", "cuda", "cpp", "torch", "reference")

_state = threading.local()
_global_override: str | None = None
#: use_backend contexts open in any thread: while 0 (and no set_backend), a hot path can skip the
#: thread-local lookup (a microsecond per call)
_contexts = 0
_contexts_lock = threading.Lock()


def _check_name(name: str, allowed: Sequence[str], op: str) -> str:
    name = name.strip().lower()
    if name == "auto":
        return name
    if name not in KNOWN:
        raise ValueError(
            f"{op}: unknown backend {name!r}; choose one of {', '.join(('auto',) + KNOWN)}"
        )
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op in this process (``None`` or ``"auto"`` restores the default)."""
    global _global_override
    if name is not None:
        _check_name(name, KNOWN, "set_backend")
    _global_override = None if name in (None, "auto") else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager forcing a backend in this thread, e.g. ``with use_backend("torch"): ...``."""
    _check_name(name, KNOWN, "use_backend")
    global _contexts
    prev = getattr(_state, "name", None)
    with _contexts_lock:
        _contexts += 1
    _state.name = None if name == "auto" else name
    try:
        yield
    finally:
        if prev is None:  # as it was: compiled code guarded on "no override" matches again
            del _state.name
        else:
            _state.name = prev
        with _contexts_lock:
            _contexts -= 1


def requested() -> str | None:
    """The backend asked for by code or environment, or None for the automatic choice."""
    name = getattr(_state, "name", None) or _global_override or os.environ.get("LCDD_BACKEND")
    if name is None or name.strip().lower() in ("", "auto"):
        return None
    return name.strip().lower()


_found: dict[str, bool] = {}


def _once(probe):
    """Run a no-argument probe once per process and keep its answer. A plain function rather than
    functools.cache: Dynamo traces through a functools cache wrapper instead of calling it, while a
    plain function marked ``assume_constant_result`` is called once per trace and its answer kept
    as a constant (no import statement and no cache lookup in the traced code)."""

    @functools.wraps(probe)
    def cached() -> bool:
        if probe.__name__ not in _found:
            _found[probe.__name__] = probe()
        return _found[probe.__name__]

    return cached


# What is installed never changes within a process.
@torch.compiler.assume_constant_result
@_once
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken Triton install raises more than ImportError
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
@_once
def native_available() -> bool:
    """True when the compiled extension ``lcdd_kernels._C`` imports."""
    try:
        from . import _C  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
@_once
def native_has_cuda() -> bool:
    if not native_available():
        return False
    from . import _C

    return bool(_C.has_cuda())


def _usable(name: str, device: torch.device) -> str | None:
    """None when ``name`` can run on ``device``, else the reason it cannot."""
    if name in ("torch", "reference"):
        return None
    if name == "triton":
        if not triton_available():
            return "Triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpret():
            return (
                "Triton kernels run on CUDA tensors; on the CPU they need the interpreter "
                "(set TRITON_INTERPRET=1 before Python starts)"
            )
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        return None
    if name == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got {device.type}"
        if not native_available():
            return "the compiled extension lcdd_kernels._C is not built (pip install -e . builds it)"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the CUDA backend runs on CUDA tensors, got {device.type}"
        if not native_has_cuda():
            return "lcdd_kernels._C was built without CUDA kernels (nvcc not found or LCDD_SKIP_CUDA_BUILD=1)"
        return None
    return f"unknown backend {name!r}"


def select(
    op: str,
    device: torch.device,
    implemented: Sequence[str],
    auto: Sequence[str],
    backend: str | None = None,
) -> str:
    """Pick the backend for one call of ``op``.

    ``implemented`` lists what the op has; ``auto`` is its preference order when nothing is
    requested (the first usable one wins; "torch" should close the list). An explicit request
    that cannot run raises a ValueError naming why and what to do.
    """
    name = backend.strip().lower() if backend is not None else requested()
    if name is not None and name != "auto":
        _check_name(name, KNOWN, op)
        if name not in implemented:
            raise ValueError(
                f"{op}: backend {name!r} is not implemented for this op; "
                f"it has {', '.join(implemented)} (set LCDD_BACKEND or backend= to one of them)"
            )
        why = _usable(name, device)
        if why is not None:
            raise ValueError(f"{op}: backend {name!r} cannot run here: {why}")
        return name
    for cand in auto:
        if cand in implemented and _usable(cand, device) is None:
            # Triton under the interpreter is for tests; never pick it automatically on CPU.
            if cand == "triton" and device.type != "cuda":
                continue
            return cand
    return "torch"
