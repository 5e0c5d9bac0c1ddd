"""Record the kernel launches that the package's host code makes, instead of running them.

Inside :func:`recording`, ``JITFunction.run`` and ``Autotuner.run`` (what ``kernel[grid](...)``
calls) store their arguments and return without compiling or launching; the host code around
them runs for real on CPU tensors. A recorded autotuned launch becomes one :class:`Launch` per
config of its autotune list (what the tuner may pick), a plain launch one :class:`Launch` with
the ``num_warps`` / ``num_stages`` the caller passed (Triton's defaults otherwise).

Arguments are kept as plain data (:func:`encode`): a tensor as its dtype and its data pointer
modulo 16 bytes, the only property of a pointer Triton specialises on. :func:`decode` rebuilds a
CPU tensor with the same dtype and misalignment, so the JIT's binder sees what it saw here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import torch

_ALIGN = 16


@dataclasses.dataclass(frozen=True)
class Launch:
    """One compile unit: a kernel, its arguments and one config."""

    module: str
    kernel: str  # the JITFunction's name (its attribute in ``module``)
    args: tuple  # encoded positional arguments
    kwargs: tuple  # sorted (name, encoded value): constexprs the caller passed and the config's
    origin: str  # which scenario first reached it, for the report

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.args, self.kwargs])

    @property
    def config(self) -> dict:
        return {k: v for k, v in self.kwargs}


def encode(v):
    if isinstance(v, torch.Tensor):
        return ["tensor", str(v.dtype).removeprefix("torch."), v.data_ptr() % _ALIGN]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"kernel_check: cannot record a launch argument of type {type(v).__name__}")


def decode(v, keep: list):
    """The argument for the binder; tensors are views into buffers appended to ``keep``."""
    if isinstance(v, list) and v and v[0] == "tensor":
        dtype = getattr(torch, v[1])
        size = torch.empty(0, dtype=dtype).element_size()
        buf = torch.empty(4 * _ALIGN, dtype=dtype)
        keep.append(buf)
        shift = (v[2] - buf.data_ptr() % _ALIGN) % _ALIGN
        if shift % size:
            raise ValueError(f"kernel_check: misalignment {v[2]} is not a multiple of {v[1]}'s size")
        return buf[shift // size:]
    return v


def _config_kwargs(config) -> dict:
    """A triton.Config as launch keyword arguments (its meta-parameters and compile options)."""
    return {k: v for k, v in config.all_kwargs().items() if v is not None}


_LAUNCH_KWARGS = ("grid", "warmup")


class Recorder:
    """Launches keyed by what Triton compiles them to: the JIT binder's specialisation (types,
    alignment and divisibility classes, constexpr values) and the compile options, so launches
    that differ only in values Triton does not specialise on count once."""

    def __init__(self):
        self.launches: dict[str, Launch] = {}
        self.origin = ""
        self._binders = {}

    def _specialisation(self, fn, call: dict) -> str:
        binder = self._binders.get(id(fn))
        if binder is None:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature

            backend = make_backend(GPUTarget("cuda", 90, 32))
            binder = self._binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, backend)
        _, specialization, _ = binder(**call)
        return json.dumps([[str(x) for x in s] for s in specialization])

    def _add(self, fn, args, kwargs):
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        opts = {k: v for k, v in kwargs.items() if k not in names and k not in _LAUNCH_KWARGS}
        pos = tuple(encode(bound.get(n, fn.params[i].default)) for i, n in enumerate(names)
                    if not fn.params[i].is_constexpr)
        const = {n: encode(bound[n]) for i, n in enumerate(names) if fn.params[i].is_constexpr and n in bound}
        kw = tuple(sorted({**const, **{k: encode(v) for k, v in opts.items()}}.items()))
        launch = Launch(fn.module, fn.__name__, pos, kw, self.origin)
        spec = self._specialisation(fn, {**bound, **{k: v for k, v in opts.items()}})
        key = json.dumps([fn.module, fn.__name__, spec, sorted((k, str(v)) for k, v in opts.items())])
        self.launches.setdefault(key, launch)

    def jit_run(self, fn, args, kwargs):
        self._add(fn, args, kwargs)

    def autotuner_run(self, tuner, args, kwargs):
        """Every config the tuner may pick for this call: its list, after its own pruning (what
        ``Autotuner.prune_configs`` does before timing)."""
        configs = tuner.configs
        prune = getattr(tuner, "early_config_prune", None)
        if prune and len(configs) > 1:
            nargs = dict(zip(tuner.arg_names, args))
            configs = prune(configs, nargs, **{k: v for k, v in kwargs.items() if k not in _LAUNCH_KWARGS})
        for config in configs:
            self._add(tuner.fn, args, {**kwargs, **_config_kwargs(config)})


@contextlib.contextmanager
def recording():
    """Within: kernel launches are recorded into the yielded :class:`Recorder`, not run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    rec = Recorder()
    saved = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid=None, warmup=False, **kwargs):
        rec.jit_run(self, args, kwargs)

    def tuner_run(self, *args, **kwargs):
        rec.autotuner_run(self, args, kwargs)

    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield rec
    finally:
        JITFunction.run, Autotuner.run = saved
