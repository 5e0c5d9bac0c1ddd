"""A carrier in vLLM's LoRA slots: its projections mapped onto vLLM's (fused) layers.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (the model's
``packed_modules_mapping``); the fused output is the parts' outputs side by side
(``output_slices``). A carrier's q, k and v share their columns (the ``attn_read`` mask), and so
do gate and up (``ffn_read``), so one fused entry holds them exactly: rows shifted by each part's
offset and concatenated, the shared columns once, the Δs stacked. Its bytes are the carrier's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...carriers.carrier import Carrier
from ...ops.carrier import CarrierTable, _Entry
from ...ops.carrier_plan import CarrierPlan


@dataclass
class CarrierSlotWeights:
    """What a carrier occupies: per vLLM LoRA module name, one fused :class:`_Entry`."""

    entries: dict[str, _Entry]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries.values() for t in (e.delta, e.rows, e.cols))


def fuse(carrier: Carrier, modules: dict, packed: dict[str, list[str]], dtype: torch.dtype,
         where: str) -> CarrierSlotWeights:
    """The carrier's entries for vLLM's LoRA ``modules`` (name -> LoRA layer), given the model's
    ``packed_modules_mapping``; a ValueError naming what does not fit (tensor parallelism, a
    projection without a LoRA layer, parts that do not share their columns)."""
    left = dict(carrier.modules)
    entries = {}
    for name, module in modules.items():
        prefix, _, last = name.rpartition(".")
        parts = packed.get(last, [last])
        paths = [f"{prefix}.{p}" if prefix else p for p in parts]
        if not any(p in left for p in paths):
            continue
        if getattr(module, "tp_size", 1) != 1:
            raise ValueError(f"{where}: {name} is split over {module.tp_size} tensor-parallel ranks; the lcdd vLLM "
                             "plugin serves carriers with tensor_parallel_size=1 only")
        if "Sharded" in type(module).__name__:
            # the fully sharded LoRA layers compute their own path and never reach the hook
            raise ValueError(f"{where}: {name} is a {type(module).__name__} (--fully-sharded-loras); the lcdd vLLM "
                             "plugin serves carriers without it")
        missing = [p for p in paths if p not in left]
        if missing:
            raise ValueError(f"{where}: the carrier has no {missing} but vLLM fuses them into {name}")
        slices = list(getattr(module, "output_slices", ()))
        if len(slices) != len(parts):
            raise ValueError(f"{where}: vLLM's {name} has output slices {slices} for the parts {parts}")
        cols = left[paths[0]].cols
        rows, deltas, offset = [], [], 0
        for p, size in zip(paths, slices):
            m = left.pop(p)
            if not torch.equal(m.cols, cols):
                raise ValueError(f"{where}: {p} and {paths[0]} have different columns, so vLLM's fused {name} cannot "
                                 "hold them as one entry")
            if m.rows.numel() and int(m.rows[-1]) >= size:
                raise ValueError(f"{where}: {p} has row {int(m.rows[-1])} but vLLM's {name} slice holds {size}")
            rows.append(m.rows.to(torch.int64) + offset)
            deltas.append(m.delta)
            offset += size
        device = module.device if isinstance(getattr(module, "device", None), torch.device) else torch.device("cpu")
        entries[name] = CarrierTable.entry(torch.cat(deltas).to(device, dtype), torch.cat(rows).to(device),
                                           cols.to(device), offset, slots=False)
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
    if all(e is None for e in entries):
        module._lcdd_plan = None
        return
    first = next(e for e in entries if e is not None)
    n_out = sum(module.output_slices)
    module._lcdd_plan = CarrierPlan.from_table(
        CarrierTable(n_out, module.input_size, list(entries), first.delta.device), first.delta.dtype)
