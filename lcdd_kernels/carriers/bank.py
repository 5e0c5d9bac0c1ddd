"""Many carriers for one base model at once (SPEC §4).

:class:`CarrierBank` keeps each carrier's compact tensors (per projection: Δ, rows, cols, and on
CUDA the row-slot map) as their own allocations, in a slot; per projection it lazily builds a
:class:`~lcdd_kernels.ops.carrier.CarrierTable`, a (slots, 6) table of pointers and sizes that the
kernels read. Adding or removing a carrier touches only its own tensors and drops the small
tables (rebuilt on next use); no other carrier is copied and no kernel is recompiled: the way
multi-LoRA servers hold adapters.

:func:`apply_carrier_bank` swaps every projection of a Hugging Face model for a
:class:`BankLinear` that calls :func:`~lcdd_kernels.bank_linear`; ``with bank.carriers(ids):``
chooses a carrier per sequence for ``model(...)`` and ``model.generate(...)``;
``bank.restore()`` puts the original ``nn.Linear`` modules back.

Dense parts (``Carrier.dense``: the LCDD model's norm weights and projection biases) are served
per sequence too, without a per-carrier copy of the model: every RMSNorm becomes a
:class:`BankNorm` and each projection with a routed bias computes ``x·Bᵀ`` without it, and then
each token gets its carrier's row of a small ``(1 + slots) × n`` table built when the bank
changes, ``table[ids + 1]``, whose rows for carrier −1 and carriers without that part take the
model's current (base) value by one select per call; one gather, no host sync, no concatenation.
Embeddings / lm_head dense parts are not routed
per sequence (a bank refuses them; apply or merge such a carrier alone).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..ops.carrier import CarrierTable, _Entry, route, row_slots
from ..ops.carrier_plan import CarrierPlan
from .bank_norm import BankNorm, norm_paths

__all__ = ["CarrierBank", "BankLinear", "BankNorm", "apply_carrier_bank"]

log = logging.getLogger("lcdd_kernels.carriers")


def _modules_of(carrier) -> Mapping:
    """A Carrier's ``modules``, or a plain mapping path -> (delta, rows, cols) / CarrierModule."""
    mods = getattr(carrier, "modules", carrier)
    if not isinstance(mods, Mapping):
        raise TypeError(f"expected a Carrier (lcdd_kernels.load_carrier) or a mapping of module path to "
                        f"(delta, rows, cols), got {type(carrier).__name__}")
    return mods


def _parts(m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(m, tuple):
        return m
    return m.delta, m.rows, m.cols


@dataclass
class _Slot:
    name: str | None
    carrier: object
    modules: dict[str, _Entry]
    extent: dict[str, tuple[int, int]]  # path -> (last row + 1, last col + 1): the least (N, K) it fits
    dense: dict[str, torch.Tensor] | None = None  # parameter path -> value, on the bank's device


@dataclass
class _Active:
    """The per-sequence carrier ids of one ``bank.carriers(...)`` context."""

    seq_ids: torch.Tensor  # (S,) int32 on the bank's device, or a 0-d tensor for "every sequence"
    any_carrier: bool
    token_ids: dict  # x's leading dimensions (a torch.Size) -> (T,) int32


class CarrierBank:
    """Carriers for one base model, resident together; each has an integer id (its slot).

    Args:
        device, dtype: where and in which dtype the deltas live: the activations' device and
            dtype (``apply_carrier_bank`` takes the model's).
        shapes: optional {projection path: (out_features, in_features)}; when given, carriers are
            checked against it and unknown paths are refused.

    Use ``add`` / ``remove`` / ``id_of`` / ``names`` to manage carriers, ``carriers(ids)`` to pick
    them per sequence in a patched model, and :func:`~lcdd_kernels.bank_linear` at op level.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 shapes: Mapping[str, tuple[int, int]] | None = None):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"CarrierBank: dtype must be a floating dtype, got {dtype}")
        self.device, self.dtype = device, dtype
        self.shapes = dict(shapes) if shapes is not None else None
        self._slots: list[_Slot | None] = []
        self._tables: dict[tuple[str, tuple[int, int]], CarrierTable] = {}
        self._plans: dict[tuple[str, tuple[int, int]], CarrierPlan] = {}  # one per table, built with it
        self._occupied: torch.Tensor | None = None
        self._route_cache: tuple | None = None
        self._active: _Active | None = None
        self._compat = None  # set by apply_carrier_bank: carrier -> None or raise
        self._swaps = None
        #: parameters a model-bound bank routes per sequence: path -> shape (norm weights, biases)
        self.dense_shapes: dict[str, tuple[int, ...]] | None = None
        #: path -> ((1 + slots, *shape) values, row 0 zeros; (1 + slots,) bool: who has one), by _changed
        self._dense_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dense_paths: frozenset[str] = frozenset()  # paths some carrier in the bank has a dense part for
        self._generation = 0  # counts changes of the carriers: what a cached plan is checked against

    # ----- managing carriers ---------------------------------------------------------------

    def add(self, carrier, name: str | None = None) -> int:
        """Load ``carrier`` (a :class:`~lcdd_kernels.Carrier`, or a mapping of projection path to
        (delta, rows, cols)) into a free slot, converted to the bank's device and dtype; returns
        its id. Other carriers are not touched. A model-bound bank refuses a carrier made for
        another base model (family, dimensions or base-weight fingerprint)."""
        if name is not None and name in self.names:
            raise ValueError(f"CarrierBank.add: a carrier named {name!r} is already in the bank "
                             f"(id {self.id_of(name)}); remove it first or choose another name")
        if self._compat is not None:
            self._compat(carrier)
        entries, extent = {}, {}
        for path, m in _modules_of(carrier).items():
            delta, rows, cols = _parts(m)
            op = f"CarrierBank.add: {path}"
            if self.shapes is not None and path not in self.shapes:
                raise ValueError(f"{op}: the model has no projection {path!r} "
                                 f"(e.g. {next(iter(self.shapes), None)!r}); is the carrier for another model?")
            for what, t in (("rows", rows), ("cols", cols), ("delta", delta)):
                _checks.tensor(op, what, t)
            n, k = self.shapes[path] if self.shapes is not None else (2**31 - 1, 2**31 - 1)
            _checks.index_vector(op, "rows", rows, n, rows.device)
            _checks.index_vector(op, "cols", cols, k, cols.device)
            _checks.floating(op, "delta", delta)
            _checks.shape(op, "delta", delta, (rows.numel(), cols.numel()), "(|rows|, |cols|)")
            extent[path] = (int(rows[-1]) + 1 if rows.numel() else 0, int(cols[-1]) + 1 if cols.numel() else 0)
            # row-slot maps (CUDA only) are built by table(), which knows each projection's N
            entries[path] = CarrierTable.entry(delta.detach().to(self.device, self.dtype), rows.to(self.device),
                                               cols.to(self.device), n, slots=False)
        slot = _Slot(name, carrier, entries, extent, self._dense_of(carrier))
        free = next((i for i, s in enumerate(self._slots) if s is None), None)
        if free is None:
            self._slots.append(slot)
            free = len(self._slots) - 1
        else:
            self._slots[free] = slot
        self._changed()
        return free

    def _dense_of(self, carrier) -> dict[str, torch.Tensor] | None:
        dense = getattr(carrier, "dense", None) or {}
        if not dense:
            return None
        op = "CarrierBank.add"
        if self.dense_shapes is None:
            log.warning("%s: this bank serves projections only (bank_linear); the carrier's %d dense parts "
                        "(norms, biases) are kept but not applied; apply_carrier_bank(model) routes them",
                        op, len(dense))
        out = {}
        for path, t in dense.items():
            if self.dense_shapes is not None:
                if path not in self.dense_shapes:
                    raise ValueError(
                        f"{op}: the carrier's dense part {path!r} is not a norm weight or projection bias of this "
                        "model; a bank routes only those per sequence (embeddings / lm_head would need a model "
                        "copy per carrier): serve this carrier alone with apply_carrier or merge_carrier_, or "
                        "extract it from an SFT run with embeddings and lm_head frozen")
                # its dtype and values were checked by the Carrier (validate_carrier), its name and
                # shape against the model by self._compat (check_compatible -> dense_targets)
            out[path] = t.detach().to(self.device, self.dtype)
        return out

    def has_dense(self, path: str) -> bool:
        """Whether any carrier in the bank has a dense part for parameter ``path`` (host-side, a set
        lookup: kept by every add / remove)."""
        return path in self._dense_paths

    def dense_rows(self, path: str, current: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per token, the value of parameter ``path`` under its carrier: (T, *shape), the carrier's
        dense part, or ``current`` (the model's value) for carrier −1 and carriers without that
        part. The (1 + slots, *shape) table and who-has-one mask are built when the bank changes;
        per call one select puts ``current`` in their empty rows (it follows the model's value, e.g.
        after a merge) and one gather reads the tokens' rows. No host sync."""
        cached = self._dense_tables.get(path)
        if cached is None:
            cached = self._dense_table(path, tuple(current.shape))
        stack, has = (t.to(current.device) for t in cached)
        cur = current.detach()[None]
        table = torch.where(has.view(-1, *([1] * current.dim())), stack.to(cur.dtype), cur)
        return table.index_select(0, ids.to(torch.long) + 1)

    def _dense_table(self, path: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + slots, *shape) values of ``path`` per carrier id + 1 (row 0, carrier −1, and carriers
        without one: zeros) and a (1 + slots,) bool of who has one; built when the bank changes
        (eagerly: a compiled forward only reads it)."""
        zeros = torch.zeros(shape, device=self.device, dtype=self.dtype)
        rows, has = [zeros], [False]
        for s in self._slots:
            v = None if s is None or s.dense is None else s.dense.get(path)
            has.append(v is not None)
            rows.append(v if v is not None else zeros)
        table = (torch.stack(rows), torch.tensor(has, device=self.device))
        self._dense_tables[path] = table
        return table

    def remove(self, key: int | str) -> None:
        """Drop a carrier (by id or name); its id becomes free for a later ``add``."""
        cid = self._key(key, "CarrierBank.remove")
        self._slots[cid] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        self._changed()

    def id_of(self, name: str) -> int:
        for i, s in enumerate(self._slots):
            if s is not None and s.name == name:
                return i
        raise KeyError(f"no carrier named {name!r} in the bank; it has {self.names}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._slots if s is not None and s.name is not None]

    @property
    def ids(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is not None]

    def carrier(self, key: int | str):
        """The carrier object that was added under ``key``."""
        return self._slots[self._key(key, "CarrierBank.carrier")].carrier

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key) -> bool:
        try:
            self._key(key, "")
        except (KeyError, ValueError, TypeError):
            return False
        return True

    def nbytes(self) -> int:
        """Bytes held by the carriers' tensors (deltas, indices, row-slot maps, dense parts)."""
        return (sum(t.numel() * t.element_size() for s in self._slots if s is not None for e in s.modules.values()
                    for t in (e.delta, e.rows, e.cols, e.row_slots) if t is not None)
                + sum(t.numel() * t.element_size() for s in self._slots if s is not None and s.dense
                      for t in s.dense.values()))

    def __repr__(self) -> str:
        items = ", ".join(f"{i}: {s.name or 'unnamed'}" for i, s in enumerate(self._slots) if s is not None)
        return f"CarrierBank({{{items}}}, device={self.device}, dtype={self.dtype}, {self.nbytes() / 2**20:.1f} MiB)"

    def _key(self, key, op: str) -> int:
        if isinstance(key, str):
            return self.id_of(key)
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"{op}: a carrier is named by its id (int) or name (str), got {type(key).__name__}")
        if not 0 <= key < len(self._slots) or self._slots[key] is None:
            raise KeyError(f"{op}: no carrier with id {key} in the bank; ids in use: {self.ids}")
        return key

    def _changed(self) -> None:
        self._generation += 1  # a BankLinear's cached plan is stale from here
        used = list(self._tables)
        self._tables.clear()
        self._plans.clear()
        self._dense_tables.clear()
        self._dense_paths = frozenset(p for s in self._slots if s is not None and s.dense for p in s.dense)
        for path, shape in (self.dense_shapes or {}).items():
            if self.has_dense(path):
                self._dense_table(path, shape)
        self._occupied = None
        self._route_cache = None
        if self._active is not None:
            self._active.token_ids.clear()
        # The tables are rebuilt now, eagerly: every projection of a model-bound bank, and the
        # ones already used of a standalone bank, so that a compiled forward only reads them
        # (building one while Dynamo traces would break the graph). The tables' sizes (slots,
        # largest |rows|) are in the graph, so a change recompiles it once.
        if self.shapes is not None:
            for path, shape in self.shapes.items():
                self.table(path, self.device, self.dtype, shape)
        for path, shape in used:
            if (path, shape) not in self._tables:
                try:
                    self.table(path, self.device, self.dtype, shape)
                except ValueError:  # a carrier that does not fit: raised again at the next use
                    pass

    # ----- what the ops read -----------------------------------------------------------------

    def table(self, module_name: str, device: torch.device, dtype: torch.dtype,
              shape: tuple[int, int]) -> CarrierTable:
        """The kernels' table of ``module_name`` (cached until the bank changes)."""
        op = "bank_linear"
        if device != self.device:
            raise ValueError(f"{op}: the bank holds its carriers on {self.device} but x is on {device}; "
                             f"create the bank on x's device (CarrierBank(device=...) / the model's device)")
        if dtype != self.dtype:
            raise TypeError(f"{op}: the bank holds {self.dtype} deltas but x is {dtype}; create the bank with "
                            f"dtype={dtype} (apply_carrier_bank uses the model's dtype)")
        if self.shapes is not None:
            if module_name not in self.shapes:
                raise KeyError(f"{op}: the bank's model has no projection {module_name!r}")
            if tuple(self.shapes[module_name]) != tuple(shape):
                raise ValueError(f"{op}: {module_name} is {tuple(self.shapes[module_name])} in the bank's model "
                                 f"but base_weight is {tuple(shape)}")
        key = (module_name, tuple(shape))
        table = self._tables.get(key)
        if table is None and torch.compiler.is_compiling():
            raise RuntimeError(
                f"{op}: the bank has no table for {module_name!r} {tuple(shape)} yet and one cannot be built "
                "inside torch.compile; call bank_linear once eagerly for this projection first (a bank from "
                "apply_carrier_bank builds every table when carriers are added)")
        if table is None:
            entries = [None if s is None else s.modules.get(module_name) for s in self._slots]
            for i, s in enumerate(self._slots):
                if s is None or module_name not in s.modules:
                    continue
                need = s.extent[module_name]
                if need[0] > shape[0] or need[1] > shape[1]:
                    raise ValueError(f"{op}: carrier {i} of {module_name} indexes rows < {need[0]} and columns "
                                     f"< {need[1]} but base_weight is {tuple(shape)}; it belongs to another model")
                if self.device.type == "cuda" and (entries[i].row_slots is None
                                                   or entries[i].row_slots.numel() != shape[0]):
                    entries[i] = s.modules[module_name] = replace(entries[i], row_slots=row_slots(entries[i].rows,
                                                                                                  shape[0]))
            table = CarrierTable(shape[0], shape[1], entries, self.device)
            if self.device.type == "cuda":
                table.mark_static()
            self._tables[key] = table
            self._plans[key] = CarrierPlan.from_table(table, self.dtype)
        return table

    def plan(self, module_name: str, shape: tuple[int, int]) -> CarrierPlan:
        """The prepared form of ``module_name``'s carriers (a
        :class:`~lcdd_kernels.ops.carrier_plan.CarrierPlan`, slot i = carrier id i), for calls
        that pay no per-call check: ``bank.plan(path, weight.shape)(x, weight, bias, ids)``.
        Every carrier was checked when it was added; the plan is rebuilt when the bank changes
        (hold the bank, not the plan, across ``add`` / ``remove``)."""
        plan = self._plans.get((module_name, tuple(shape)))
        if plan is None:
            self.table(module_name, self.device, self.dtype, shape)
            plan = self._plans[(module_name, tuple(shape))]
        return plan

    def check_ids(self, ids: torch.Tensor, op: str) -> None:
        """Every id is −1 or the id of a carrier in the bank (one reduction, one host sync)."""
        n = len(self._slots)
        if self._occupied is None or self._occupied.device != ids.device:
            self._occupied = torch.tensor([s is not None for s in self._slots] or [False], device=ids.device)
        bad = (ids < -1) | (ids >= n)
        if n:
            bad |= (ids >= 0) & ~self._occupied[ids.clamp(0, n - 1).long()]
        if bool(bad.any()):
            first = ids[bad.nonzero()[0, 0]].item()
            raise ValueError(f"{op}: carrier id {first} is not in the bank (ids in use: {self.ids}; −1 means "
                             "no carrier)")

    def routing(self, ids: torch.Tensor, n_slots: int):
        """(token order, offsets) grouped by carrier for the Triton kernel; reused while the same
        ids tensor is passed (every projection of one forward)."""
        cache = self._route_cache
        if cache is None or cache[0] is not ids or cache[1] != n_slots:
            cache = (ids, n_slots, route(ids, n_slots, ids.numel(), ids.device))
            self._route_cache = cache
        return cache[2]

    # ----- per-sequence carriers in a patched model ---------------------------------------------

    @contextlib.contextmanager
    def carriers(self, ids) -> Iterator["CarrierBank"]:
        """Choose a carrier per sequence for the patched model inside the block.

        ``ids``: one id / name / None for every sequence, or one per sequence of the batch
        (a list, or a 1-D integer tensor); None or −1 is the base model. When the model runs a
        multiple of that many sequences (``num_return_sequences``, beam search), each id covers
        its consecutive copies, as ``generate`` expands inputs. Nests; restores the previous
        choice on exit.
        """
        seq = self._resolve(ids)
        prev = self._active
        # on the bank's device once, here: a forward reads it (a compiled one as a graph input,
        # so other ids need no recompilation) and copies nothing from the host
        self._active = _Active(seq.to(self.device), bool((seq >= 0).any()), {})
        try:
            yield self
        finally:
            self._active = prev

    def _resolve(self, ids) -> torch.Tensor:
        op = "CarrierBank.carriers"

        def one(v) -> int:
            if v is None:
                return -1
            if isinstance(v, int) and not isinstance(v, bool) and v == -1:
                return -1
            return self._key(v, op)

        if isinstance(ids, torch.Tensor):
            if ids.dtype not in _checks.INDEX_DTYPES or ids.dim() > 1:
                raise TypeError(f"{op}: ids as a tensor must be a 0-d or 1-D int32/int64 tensor, got "
                                f"{ids.dtype} of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if ids is None or isinstance(ids, (int, str)):
            return torch.tensor(one(ids), dtype=torch.int32)
        if not isinstance(ids, Sequence) or len(ids) == 0:
            raise ValueError(f"{op}: ids must be an id, a name, None, or a non-empty list of them (one per sequence)")
        return torch.tensor([one(v) for v in ids], dtype=torch.int32)

    def token_ids(self, x: torch.Tensor) -> torch.Tensor | None:
        """(T,) int32 carrier id per token of x (batch, ..., K), or None when no carrier applies.

        Traceable without a graph break or a host sync: shapes and Python state only. Eagerly a
        context whose ids are all −1 runs the base projections, and the ids are cached per
        shape; a compiled forward always runs the bank op (the −1 tokens add nothing), so that
        switching ids between carriers and none does not recompile."""
        a = self._active
        if a is None:
            return None
        compiling = torch.compiler.is_compiling()
        if not compiling and not a.any_carrier:
            return None
        # keyed by x's leading dimensions, which fix batch and tokens per sequence (the ids live
        # on the bank's device whatever x's is, and a plan refuses an x on another device)
        key = x.shape[:-1]
        ids = None if compiling else a.token_ids.get(key)
        if ids is None:
            batch = key[0] if len(key) else 1
            per_seq = math.prod(key[1:]) if len(key) else 1
            s = a.seq_ids
            # contiguous once here, not per projection
            if s.dim() == 0:
                ids = s.expand(batch * per_seq).contiguous()
            elif batch % s.numel() == 0:
                ids = s[:, None].expand(s.numel(), batch // s.numel() * per_seq).reshape(-1).contiguous()
            else:
                raise ValueError(f"bank.carriers got {s.numel()} carrier ids but the model runs a batch of "
                                 f"{batch} sequences; give one id per sequence")
            if not compiling:
                a.token_ids[key] = ids
        return ids

    # ----- model patching ------------------------------------------------------------------------

    def restore(self) -> nn.Module:
        """Undo :func:`apply_carrier_bank`: the model's original ``nn.Linear`` modules go back."""
        if self._swaps is None:
            raise RuntimeError("CarrierBank.restore: this bank is not applied to a model")
        model = self._swaps.undo()
        self._swaps = None
        return model


class BankLinear(nn.Module):
    """A base projection served with a carrier bank. ``weight`` and ``bias`` are the original
    linear's Parameters (shared, not copied); the bank's active ``carriers(...)`` context picks
    each token's carrier; outside one, it is the base projection."""

    def __init__(self, linear: nn.Linear, bank: CarrierBank, path: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.bank, self.path = bank, path
        self._plan, self._generation = None, -1

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, carriers={self.bank.ids}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        ids = bank.token_ids(x)
        weight, bias = self.weight, self.bias  # one module attribute lookup each (a microsecond)
        if ids is None:
            return F.linear(x, weight, bias)
        # the prepared path: the carriers were checked when added, the ids when the context opened;
        # the plan is looked up once per change of the bank, not per call
        if torch.compiler.is_compiling():  # traced: no guards on the eager cache below
            plan = bank.plan(self.path, weight.shape)
        else:
            plan = self._plan
            if plan is None or self._generation != bank._generation:
                plan = self._plan = bank.plan(self.path, weight.shape)
                self._generation = bank._generation
        if bias is not None and bank.has_dense(f"{self.path}.bias"):
            # a carrier brings its own bias: x·Bᵀ (+ carrier rows), then each token's bias row
            y = plan(x, weight, None, ids)
            return y + bank.dense_rows(f"{self.path}.bias", bias, ids).view(y.shape).to(y.dtype)
        return plan(x, weight, bias, ids)


def _carrier_list(carriers, verify=None) -> list[tuple[str | None, object]]:
    """(name, Carrier) pairs; carrier directories (paths) are loaded here, checked against the
    public key ``verify`` when it is given (loaded Carrier objects cannot be, so they are refused)."""
    def one(c):
        if isinstance(c, (str, os.PathLike)):
            from .load import load_carrier

            return load_carrier(c, verify=verify)
        if verify is not None:
            raise TypeError("apply_carrier_bank(verify=...) checks the signatures of carrier directories: pass "
                            f"their paths, not loaded {type(c).__name__} objects")
        return c

    def is_one(c):
        return hasattr(c, "modules") or isinstance(c, (str, os.PathLike))

    if carriers is None:
        return []
    if isinstance(carriers, Mapping) and not hasattr(carriers, "modules") and all(
            isinstance(k, str) and is_one(v) for k, v in carriers.items()):
        return [(k, one(v)) for k, v in carriers.items()]  # {name: Carrier or directory}
    if is_one(carriers):
        return [(None, one(carriers))]
    return [(None, one(c)) for c in carriers]


def apply_carrier_bank(model: nn.Module, carriers=None, allow_fingerprint_mismatch: bool = False,
                       verify: str | os.PathLike | None = None) -> CarrierBank:
    """Serve ``model`` (a base Llama / Mistral / Qwen2 / Qwen3 causal LM) with many carriers.

    Every projection becomes a :class:`BankLinear` sharing the original weight, every RMSNorm a
    :class:`BankNorm` (each sequence gets its carrier's dense norm weights and biases); ``carriers`` (a
    Carrier or carrier directory, a list of them, or {name: either}) are added in order (ids 0, 1,
    ...). ``verify``: a PEM public key; every carrier must then be given as a directory signed by
    its private key (``load_carrier(dir, verify=...)``), or nothing is patched. Returns the
    bank: ``with bank.carriers([0, 2, None]): model.generate(...)`` runs sequence i with carrier
    ``ids[i]``; ``bank.add`` / ``bank.remove`` change the carriers at any time; ``bank.restore()``
    undoes the patch. The base weights are fingerprinted once here; a carrier trained against
    other base weights is refused unless ``allow_fingerprint_mismatch=True``. Run the model under
    ``torch.no_grad()`` / ``torch.inference_mode()`` (``generate`` does) or with frozen weights.
    """
    from ..models.families import plain_linear_paths
    from ..models.swap import ModuleSwaps
    from .compat import check_compatible
    from .extract import base_fingerprint

    listed = _carrier_list(carriers, verify)  # loaded and verified before the model is touched
    paths = plain_linear_paths(model, "apply_carrier_bank",
                               "undo the other patch (handle.remove() / bank.restore()) first")
    first = model.get_submodule(paths[0][2]).weight
    shapes = {p: tuple(model.get_submodule(p).weight.shape) for _, _, p in paths}
    bank = CarrierBank(first.device, first.dtype, shapes)
    fingerprint = None if allow_fingerprint_mismatch else base_fingerprint(model)
    model_ref = weakref.ref(model)

    def compat(carrier) -> None:
        if not hasattr(carrier, "base_fingerprint"):
            raise TypeError("apply_carrier_bank: a model's bank takes Carrier objects (load_carrier / "
                            f"extract_carrier), got {type(carrier).__name__}")
        check_compatible(model_ref(), carrier, allow_fingerprint_mismatch, fingerprint=fingerprint)

    bank._compat = compat
    norms = norm_paths(model)
    bank.dense_shapes = {f"{p}.weight": tuple(m.weight.shape) for p, m in norms.items()}
    bank.dense_shapes.update({f"{p}.bias": tuple(model.get_submodule(p).bias.shape) for _, _, p in paths
                              if model.get_submodule(p).bias is not None})
    for name, carrier in listed:
        bank.add(carrier, name=name)
    swaps = ModuleSwaps(model)
    for _, _, path in paths:
        swaps.swap(path, BankLinear(model.get_submodule(path), bank, path))
    for path, norm in norms.items():
        swaps.swap(path, BankNorm(norm, bank, path))
    bank._swaps = swaps
    return bank
