"""A carrier in vLLM's LoRA slots: its projections mapped onto vLLM's (fused) layers.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (the model's
``packed_modules_mapping``); the fused output is the parts' outputs side by side
(``output_slices``). A carrier's q, k and v share their columns (the ``attn_read`` mask), and so
do gate and up (``ffn_read``), so one fused entry holds them exactly: rows shifted by each part's
offset and concatenated, the shared columns once, the Δs stacked. Its bytes are the carrier's.
Under tensor parallelism each rank's entry keeps only that rank's rows or columns (:mod:`.shards`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...carriers.carrier import Carrier
from ...ops.carrier import CarrierTable, _Entry
from ...ops.carrier_plan import CarrierPlan
from .shards import shard_view


@dataclass
class CarrierSlotWeights:
    """What a carrier occupies: per vLLM LoRA module name, one fused :class:`_Entry`."""

    entries: dict[str, _Entry]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries.values() for t in (e.delta, e.rows, e.cols))


def fuse(carrier: Carrier, modules: dict, packed: dict[str, list[str]], dtype: torch.dtype,
         where: str) -> CarrierSlotWeights:
    """The carrier's entries for vLLM's LoRA ``modules`` (name -> LoRA layer), given the model's
    ``packed_modules_mapping``; a ValueError naming what does not fit (a layer split in a way the
    plugin does not know, a projection without a LoRA layer, parts that do not share their columns).
    Under tensor parallelism each layer keeps only this rank's rows or columns (:mod:`.shards`); a
    layer where this rank holds none of the carrier gets no entry (it adds nothing there)."""
    left = dict(carrier.modules)
    entries = {}
    for name, module in modules.items():
        prefix, _, last = name.rpartition(".")
        parts = packed.get(last, [last])
        paths = [f"{prefix}.{p}" if prefix else p for p in parts]
        if not any(p in left for p in paths):
            continue
        if "Sharded" in type(module).__name__:
            # the fully sharded LoRA layers compute their own path and never reach the hook
            raise ValueError(f"{where}: {name} is a {type(module).__name__} (--fully-sharded-loras); the lcdd vLLM "
                             "plugin serves carriers without it")
        missing = [p for p in paths if p not in left]
        if missing:
            raise ValueError(f"{where}: the carrier has no {missing} but vLLM fuses them into {name}")
        try:
            view = shard_view(module, parts, name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        cols = left[paths[0]].cols
        mods = []
        for p in paths:
            m = left.pop(p)
            if not torch.equal(m.cols, cols):
                raise ValueError(f"{where}: {p} and {paths[0]} have different columns, so vLLM's fused {name} cannot "
                                 "hold them as one entry")
            mods.append(m)
        rows, deltas = [], []
        for seg in sorted(view.segments, key=lambda s: s.local):
            m = mods[seg.part]
            r = m.rows.to(torch.int64)
            if view.whole and r.numel() and int(r[-1]) >= seg.length:
                raise ValueError(f"{where}: {paths[seg.part]} has row {int(r[-1])} but vLLM's {name} slice holds "
                                 f"{seg.length}")
            keep = (r >= seg.start) & (r < seg.start + seg.length)
            rows.append(r[keep] - seg.start + seg.local)
            deltas.append(m.delta[keep])
        rows, delta = torch.cat(rows), torch.cat(deltas)
        cols = cols.to(torch.int64)
        if view.in_size is not None:  # row-parallel: this rank's input columns only
            keep = (cols >= view.in_start) & (cols < view.in_start + view.in_size)
            cols, delta = cols[keep] - view.in_start, delta[:, keep]
        if not rows.numel() or not cols.numel():
            continue
        device = module.device if isinstance(getattr(module, "device", None), torch.device) else torch.device("cpu")
        entries[name] = CarrierTable.entry(delta.to(device, dtype), rows.to(device), cols.to(device), view.n_out,
                                           slots=False)
    if left:
        raise ValueError(f"{where}: the served model has no LoRA layer for {len(left)} of the carrier's projections "
                         f"(e.g. {next(iter(left))}); start vLLM without --lora-target-modules, or with all of "
                         "q/k/v/o/gate/up/down")
    return CarrierSlotWeights(entries)


def set_slot(module, index: int, n_slots: int, entry: _Entry | None) -> None:
    """Put a carrier's entry (or nothing) into LoRA slot ``index`` of one vLLM LoRA layer, and
    rebuild the layer's small table (None while no slot holds a carrier)."""
    entries = getattr(module, "_lcdd_entries", None)
    if entries is None or len(entries) != n_slots:
        entries = module._lcdd_entries = [None] * n_slots
    entries[index] = entry
    module._lcdd_slots = frozenset(i for i, e in enumerate(entries) if e is not None)
    if not module._lcdd_slots:
        module._lcdd_plan = None
        return
    first = next(e for e in entries if e is not None)
    n_out = sum(module.output_slices)
    module._lcdd_plan = CarrierPlan.from_table(
        CarrierTable(n_out, module.input_size, list(entries), first.delta.device), first.delta.dtype)
