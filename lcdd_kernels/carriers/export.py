"""A carrier as a standard PEFT adapter directory, for PEFT and for vLLM (SPEC §4).

A carrier is a low-rank adapter with no approximation: Δ placed at ``rows × cols`` of an N×K
weight equals ``B·A`` with ``A`` the one-hot selection of the columns (|cols|×K) and ``B`` the
delta scattered into the rows (N×|cols|), or the transposed choice (``B`` one-hot over the rows,
``A`` the delta scattered into the columns), whichever rank ``min(|rows|, |cols|)`` is smaller.

- ``kind="lora"``: that construction, per-module rank in ``rank_pattern`` and ``alpha_pattern``
  equal to it, so that every module's scaling ``alpha / r`` is exactly 1. ``max_rank`` caps the
  rank (engines have limits: vLLM's ``max_lora_rank`` is at most 512) by a truncated SVD of Δ;
  the report gives, per module, the rank kept and the relative error of Δ, and with a base
  model the logit change on a probe batch.
- ``kind="shira"``: PEFT's sparse adapter (SHiRA: indices and values), exact. PEFT sizes every
  module's SHiRA at ``r·(N + K)`` entries for one ``r``; entries beyond the carrier's are zeros at
  positions outside ``rows × cols``.

Files are written as PEFT writes them (``adapter_config.json``, ``adapter_model.safetensors``,
keys ``base_model.model.<module>.lora_A.weight`` …), plus ``lcdd_export.json`` (the report and
where the adapter came from; PEFT and vLLM ignore it). Writing needs neither PEFT nor vLLM.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .export_dense import add_dense, dense_plan
from .carrier import Carrier, CarrierModule
from .layout import projection_paths

__all__ = ["export_peft", "ExportReport", "ModuleExport", "VLLM_LORA_RANKS", "vllm_max_lora_rank",
           "lora_nbytes", "carrier_nbytes"]

#: The values vLLM 0.32 accepts for ``max_lora_rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KINDS = ("lora", "shira")
TARGETS = ("peft", "vllm")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "lcdd_export.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model: how PEFT names saved keys

log = logging.getLogger("lcdd_kernels.carriers")


@dataclass
class ModuleExport:
    """One projection in the adapter: ``rank`` is the carrier's exact rank bound min(|rows|, |cols|)
    (the selection construction's rank), ``kept`` the rank written, ``rel_error`` =
    ‖Δ − Δ_kept‖_F / ‖Δ‖_F (0.0 when exact), ``entries`` the values stored for it."""

    path: str
    shape: tuple[int, int]
    rows: int
    cols: int
    rank: int
    kept: int
    rel_error: float
    entries: int


@dataclass
class ExportReport:
    """What :func:`export_peft` wrote and what it cost. ``logit_change``: max |Δ logit| between
    the carrier and the exported adapter on a probe batch (only with ``max_rank`` and a base
    model; ``None`` otherwise), ``logit_scale`` the probe's max |logit| for scale."""

    kind: str
    target: str
    out_dir: str
    exact: bool
    max_rank: int | None
    dtype: str
    modules: list[ModuleExport]
    adapter_bytes: int
    carrier_bytes: int
    vllm_max_lora_rank: int | None
    dense_exported: list[str] = field(default_factory=list)
    dense_dropped: list[str] = field(default_factory=list)
    logit_change: float | None = None
    logit_scale: float | None = None
    #: SHiRA: zero entries written beyond the carrier's (PEFT sizes every module at r·(N + K))
    padded_entries: int = 0

    @property
    def truncated(self) -> list[ModuleExport]:
        return [m for m in self.modules if m.kept < m.rank]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.kind} adapter written to {self.out_dir}: {len(self.modules)} modules, "
                 f"{self.adapter_bytes / 2**20:.2f} MiB (the carrier: {self.carrier_bytes / 2**20:.2f} MiB), "
                 f"{'exact' if self.exact else 'NOT exact'}"]
        if self.kind == "lora":
            ranks = [m.kept for m in self.modules]
            lines.append(f"  ranks {min(ranks)}..{max(ranks)}; vLLM: --max-lora-rank {self.vllm_max_lora_rank}"
                         if self.vllm_max_lora_rank else
                         f"  ranks {min(ranks)}..{max(ranks)}; above vLLM's limit of 512: export with max_rank")
        cut = self.truncated
        if cut:
            worst = max(cut, key=lambda m: m.rel_error)
            lines.append(f"  max_rank {self.max_rank}: {len(cut)} of {len(self.modules)} modules truncated, "
                         f"worst relative error of Δ {worst.rel_error:.3g} ({worst.path}: rank {worst.kept} of "
                         f"{worst.rank})")
        elif self.max_rank is not None:
            lines.append(f"  max_rank {self.max_rank}: no module needed truncating")
        if self.logit_change is not None:
            lines.append(f"  logit change on the probe batch: max |Δ| {self.logit_change:.3g} "
                         f"(max |logit| {self.logit_scale:.3g})")
        if self.dense_exported:
            lines.append(f"  dense parts exported: {len(self.dense_exported)} ({', '.join(self.dense_exported[:3])}"
                         f"{'...' if len(self.dense_exported) > 3 else ''})")
        if self.dense_dropped:
            lines.append(f"  dense parts DROPPED (drop_dense): {len(self.dense_dropped)} "
                         f"({', '.join(self.dense_dropped[:3])}{'...' if len(self.dense_dropped) > 3 else ''})")
        if self.padded_entries:
            total = sum(m.entries for m in self.modules)
            lines.append(f"  SHiRA padding: {self.padded_entries:,} zero entries of {total:,} ({self.padded_entries / total:.1%}; "
                         "PEFT gives every module r·(N+K) entries for one r); exact, kind='lora' has none")
        return "\n".join(lines)

    def warn(self) -> None:
        """Log what the export chose or cost that the caller may not have seen: modules truncated
        by ``max_rank`` (how many, the worst error), dense parts left out (``drop_dense``), SHiRA's
        zero padding."""
        cut = self.truncated
        if cut:
            worst = max(cut, key=lambda m: m.rel_error)
            log.warning("export_peft: max_rank=%d truncated %d of %d modules by SVD of Δ (worst relative error %.3g "
                        "at %s, rank %d of %d%s); the adapter is not the carrier; leave max_rank unset for the exact "
                        "adapter", self.max_rank, len(cut), len(self.modules), worst.rel_error, worst.path,
                        worst.kept, worst.rank,
                        "" if self.logit_change is None else
                        f"; max |Δ logit| {self.logit_change:.3g} on the probe batch")
        if self.dense_dropped:
            log.warning("export_peft: drop_dense=True left %d dense parts of the carrier out of the adapter (%s): "
                        "served with it, the model is not the carrier's model there", len(self.dense_dropped),
                        ", ".join(self.dense_dropped[:4]) + ("..." if len(self.dense_dropped) > 4 else ""))
        if self.padded_entries:
            log.info("export_peft(kind='shira'): %d zero entries padded (PEFT sizes every module at r·(N+K)); "
                     "exact; kind='lora' needs no padding", self.padded_entries)


# ---------------------------------------------------------------------------------------------
# Sizes (also used by the sizes table, lcdd_kernels/bench/adapter_sizes.py)
# ---------------------------------------------------------------------------------------------


def carrier_nbytes(rows: int, cols: int, elem: int) -> int:
    """Bytes of one projection as a carrier stores it: Δ plus int32 rows and cols."""
    return rows * cols * elem + 4 * (rows + cols)


def lora_nbytes(n: int, k: int, rank: int, elem: int) -> int:
    """Bytes of one projection as a LoRA of ``rank``: B (N×r) and A (r×K)."""
    return rank * (n + k) * elem


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM 0.32 accepts that holds ``rank``; None above 512."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), None)


# ---------------------------------------------------------------------------------------------
# LoRA factors
# ---------------------------------------------------------------------------------------------


def _exact_factors(m: CarrierModule, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (N×r), A (r×K)) with B·A = Δ scattered at rows × cols, r = min(|rows|, |cols|)."""
    rows, cols, delta = m.rows.long(), m.cols.long(), m.delta.double()
    nr, nc = rows.numel(), cols.numel()
    if nc <= nr:  # A selects the columns, B holds Δ in its rows
        a = torch.zeros(nc, k, dtype=torch.float64)
        a[torch.arange(nc), cols] = 1.0
        b = torch.zeros(n, nc, dtype=torch.float64)
        b[rows] = delta
    else:  # B selects the rows, A holds Δ in its columns
        b = torch.zeros(n, nr, dtype=torch.float64)
        b[rows, torch.arange(nr)] = 1.0
        a = torch.zeros(nr, k, dtype=torch.float64)
        a[:, cols] = delta
    return b, a


def _truncated_factors(m: CarrierModule, n: int, k: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` SVD of Δ scattered into (B, A), and ‖Δ − Δ_rank‖_F / ‖Δ‖_F."""
    delta = m.delta.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    total = float(s.square().sum())
    err = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()
    b = torch.zeros(n, rank, dtype=torch.float64)
    b[m.rows.long()] = u[:, :rank] * root
    a = torch.zeros(rank, k, dtype=torch.float64)
    a[:, m.cols.long()] = root[:, None] * vh[:rank]
    return b, a, err


def _module_shapes(carrier: Carrier) -> dict[str, tuple[int, int]]:
    """(N, K) of every projection of the carrier, from its family table and dims."""
    return {path: carrier.dims.shape(p) for _, p, path in projection_paths(carrier.family_spec, carrier.dims.num_layers)}


def _lora_tensors(carrier: Carrier, max_rank: int | None, dtype: torch.dtype):
    shapes = _module_shapes(carrier)
    tensors, report, ranks = {}, [], {}
    for path, m in carrier.modules.items():
        n, k = shapes[path]
        rank = min(m.rows.numel(), m.cols.numel())
        if rank == 0:
            # PEFT has no rank-0 LoRA: a rank-1 adapter of zeros is exact (and 1·(N+K) values)
            b, a, kept, err = torch.zeros(n, 1, dtype=torch.float64), torch.zeros(1, k, dtype=torch.float64), 1, 0.0
        elif max_rank is not None and rank > max_rank:
            b, a, err = _truncated_factors(m, n, k, max_rank)
            kept = max_rank
        else:
            (b, a), kept, err = _exact_factors(m, n, k), rank, 0.0
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[path] = kept
        report.append(ModuleExport(path, (n, k), m.rows.numel(), m.cols.numel(), rank, min(kept, rank) if rank else 0,
                                   err, kept * (n + k)))
    return tensors, report, ranks


def _lora_config(carrier: Carrier, ranks: dict[str, int]) -> dict:
    """PEFT's LoraConfig fields. One r and lora_alpha for all (the largest rank, alpha = r, so
    that an engine reading only those also scales by 1); per module rank_pattern and
    alpha_pattern (alpha = rank: scaling 1). Keys are full module paths (PEFT matches them as
    ``(.*\\.)?<key>$``, which for ``model.layers.3.…`` hits that module alone)."""
    r = max(ranks.values())
    names = sorted({p.rsplit(".", 1)[-1] for p in ranks})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": carrier.base_name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": dict(ranks),
        "alpha_pattern": {p: float(v) for p, v in ranks.items()},
        "target_modules": names,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


# ---------------------------------------------------------------------------------------------
# SHiRA
# ---------------------------------------------------------------------------------------------


def _shira_r(carrier: Carrier, shapes: dict[str, tuple[int, int]]) -> int:
    need = {p: math.ceil(m.numel / (shapes[p][0] + shapes[p][1])) for p, m in carrier.modules.items()}
    r = max(1, max(need.values()))
    too_small = [(p, n * k // (n + k)) for p, (n, k) in shapes.items() if r * (n + k) > n * k]
    if too_small:
        p, most = too_small[0]
        worst = max(need, key=need.get)
        raise ValueError(
            f"export_peft(kind='shira'): PEFT gives every SHiRA module r·(N+K) entries for one r; this carrier "
            f"needs r={r} (for {worst}), but {p} can hold at most r={most} (PEFT refuses more entries than the "
            f"weight has). The carrier cannot be a SHiRA adapter exactly; export it as kind='lora' instead")
    return r


def _shira_tensors(carrier: Carrier, dtype: torch.dtype):
    shapes = _module_shapes(carrier)
    r = _shira_r(carrier, shapes)
    tensors, report = {}, []
    for path, m in carrier.modules.items():
        n, k = shapes[path]
        count = r * (n + k)
        rows, cols = m.rows.long(), m.cols.long()
        rr, cc = rows[:, None].expand(-1, cols.numel()).reshape(-1), cols[None, :].expand(rows.numel(), -1).reshape(-1)
        values = m.delta.reshape(-1)
        pad = count - values.numel()
        if pad:
            # zeros at the first positions outside rows × cols (row-major): exact, and no index repeats
            taken = torch.zeros(n * k, dtype=torch.bool)
            taken[rr * k + cc] = True
            free = torch.nonzero(~taken).flatten()[:pad]
            rr, cc = torch.cat([rr, free // k]), torch.cat([cc, free % k])
            values = torch.cat([values, values.new_zeros(pad)])
        tensors[f"{PREFIX}{path}.shira_weight"] = values.to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.shira_indices"] = torch.stack([rr, cc]).to(torch.int32).contiguous()
        report.append(ModuleExport(path, (n, k), m.rows.numel(), m.cols.numel(),
                                   min(m.rows.numel(), m.cols.numel()), min(m.rows.numel(), m.cols.numel()), 0.0,
                                   count))
    config = {
        "peft_type": "SHIRA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": carrier.base_name,
        "r": r,
        "mask_type": "random",  # only used to size the module on load; the saved indices replace the mask
        "random_seed": 0,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in carrier.modules}),
        "fan_in_fan_out": False,
        "init_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    return tensors, report, config


# ---------------------------------------------------------------------------------------------
# Probe: what max_rank costs in logits
# ---------------------------------------------------------------------------------------------


def _as_carrier(carrier: Carrier, tensors: dict[str, torch.Tensor]) -> Carrier:
    """The exported LoRA as a carrier (Δ_kept = (B·A)[rows][:, cols], fp64 then the carrier dtype)."""
    from dataclasses import replace

    mods = {}
    for path, m in carrier.modules.items():
        a = tensors[f"{PREFIX}{path}.lora_A.weight"].double()
        b = tensors[f"{PREFIX}{path}.lora_B.weight"].double()
        delta = (b[m.rows.long()] @ a[:, m.cols.long()]).to(carrier.dtype)
        mods[path] = CarrierModule(m.rows, m.cols, delta)
    return replace(carrier, modules=mods, theta=None)


@torch.no_grad()
def probe_logit_change(base_model, carrier: Carrier, approx: Carrier, probe: torch.Tensor | None = None,
                       allow_fingerprint_mismatch: bool = False) -> tuple[float, float]:
    """(max |logits(carrier) − logits(approx)|, max |logits(carrier)|) on ``probe`` (token ids;
    default: 4 sequences of 32 tokens drawn with seed 0). The model is restored afterwards."""
    from .apply import apply_carrier

    if probe is None:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, base_model.config.vocab_size, (4, 32), generator=g)
    probe = probe.to(next(base_model.parameters()).device)
    out = []
    for c in (carrier, approx):
        handle = apply_carrier(base_model, c, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
        try:
            out.append(base_model(input_ids=probe).logits.double())
        finally:
            handle.remove()
    return float((out[0] - out[1]).abs().max()), float(out[0].abs().max())


# ---------------------------------------------------------------------------------------------
# export_peft
# ---------------------------------------------------------------------------------------------


def _out_dir_conflict(out: Path, overwrite: bool):
    def conflict(existing: Path) -> str | None:
        if any(existing.iterdir()) and not overwrite:
            return (f"{out} exists and is not empty; choose a new directory or pass overwrite=True "
                    "(CLI: --overwrite) to replace the adapter there")
        return None

    return conflict


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    reason = _out_dir_conflict(out, overwrite)(out) if out.is_dir() else None
    if reason:
        raise FileExistsError(reason)


def _write(out: Path, tensors: dict[str, torch.Tensor], config: dict, report: dict, overwrite: bool) -> None:
    """The adapter files, published atomically (a crash leaves the whole old or the whole new
    adapter); other files already in ``out`` are kept."""
    from safetensors.torch import save_file

    from ..atomic import publish_dir

    owned = {n for name in (WEIGHTS_NAME, REPORT_NAME, CONFIG_NAME) for n in (name, f".{name}.tmp")}
    with publish_dir(out, conflict=_out_dir_conflict(out, overwrite), owned=owned) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2), encoding="utf-8")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")


def export_peft(carrier: Carrier, out_dir: str | os.PathLike, kind: str = "lora", max_rank: int | None = None,
                dtype: torch.dtype | None = None, *, target: str = "peft", base_model=None,
                probe: torch.Tensor | None = None, overwrite: bool = False, drop_dense: bool = False,
                allow_fingerprint_mismatch: bool = False) -> ExportReport:
    """Write ``carrier`` as a PEFT adapter directory; returns an :class:`ExportReport`.

    Args:
        kind: ``"lora"`` (exact unless ``max_rank`` truncates) or ``"shira"`` (exact).
        max_rank: LoRA only: cap each module's rank by a truncated SVD of Δ (modules at or below
            it stay exact). The report names every truncated module, its kept rank and error.
        dtype: of the adapter tensors (default: the carrier's).
        target: ``"peft"``, or ``"vllm"`` to also check what vLLM 0.32 can serve (LoRA, rank at
            most 512, no dense parts); the report gives the ``--max-lora-rank`` to use.
        base_model: the base model the carrier was made against: with ``max_rank``, the logit
            change on ``probe`` (token ids; default 4×32 random tokens) between the carrier and
            the truncated adapter; needed to write a carrier's SFT biases as LoRA biases.
        overwrite: replace an existing non-empty ``out_dir`` (refused otherwise).
        drop_dense: export without the carrier's dense parts (norms, biases) where the target
            cannot hold them, knowingly; refused otherwise.

    Truncation by ``max_rank`` and dense parts dropped are logged as warnings (how many, the worst
    error, the names) besides the report; SHiRA's zero padding is in the report and its summary.
    """
    if kind not in KINDS:
        raise ValueError(f"export_peft: kind must be one of {KINDS}, got {kind!r}")
    if target not in TARGETS:
        raise ValueError(f"export_peft: target must be one of {TARGETS}, got {target!r}")
    if max_rank is not None:
        if kind != "lora":
            raise ValueError("export_peft: max_rank applies to kind='lora' only (SHiRA is sparse, not low-rank)")
        if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
            raise ValueError(f"export_peft: max_rank must be a positive integer, got {max_rank!r}")
    if target == "vllm" and kind != "lora":
        raise ValueError("export_peft: vLLM serves LoRA adapters, not SHiRA; use kind='lora' with target='vllm'")
    dtype = dtype or carrier.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"export_peft: dtype must be a floating dtype, got {dtype}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    plan = dense_plan(carrier, kind, target, drop_dense, base_model)

    if kind == "lora":
        top = max(min(m.rows.numel(), m.cols.numel(), max_rank or math.inf) for m in carrier.modules.values())
        top = max(int(top), 1)
        vllm_rank = vllm_max_lora_rank(top)
        if target == "vllm" and vllm_rank is None:
            raise ValueError(f"export_peft(target='vllm'): the exact adapter needs rank {top} but vLLM serves ranks "
                             f"up to 512; pass max_rank=512 or lower (CLI: --max-rank) to truncate, knowing "
                             "the report tells what it costs")
        tensors, modules, ranks = _lora_tensors(carrier, max_rank, dtype)
        config = _lora_config(carrier, ranks)
    else:
        tensors, modules, config = _shira_tensors(carrier, dtype)
        vllm_rank = None
    add_dense(carrier, plan, config, tensors, dtype, base_model, allow_fingerprint_mismatch, PREFIX)

    elem = carrier.dtype.itemsize
    exact = all(m.rel_error == 0.0 and m.kept == m.rank for m in modules) and not plan.dropped
    if dtype != carrier.dtype and torch.finfo(dtype).eps > torch.finfo(carrier.dtype).eps:
        exact = False  # Δ rounded to a coarser dtype
    report = ExportReport(
        kind=kind, target=target, out_dir=str(out), exact=exact, max_rank=max_rank,
        dtype=str(dtype).replace("torch.", ""), modules=modules,
        adapter_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        carrier_bytes=sum(carrier_nbytes(m.rows.numel(), m.cols.numel(), elem) for m in carrier.modules.values())
        + sum(t.numel() * t.element_size() for t in (getattr(carrier, "dense", None) or {}).values()),
        vllm_max_lora_rank=vllm_rank, dense_exported=plan.exported, dense_dropped=plan.dropped,
        padded_entries=sum(m.entries - m.rows * m.cols for m in modules) if kind == "shira" else 0)
    if kind == "lora" and report.truncated and base_model is not None:
        report.logit_change, report.logit_scale = probe_logit_change(
            base_model, carrier, _as_carrier(carrier, tensors), probe, allow_fingerprint_mismatch)
    report.warn()
    meta = {"source": {"base_model": carrier.base_name, "base_fingerprint": carrier.base_fingerprint,
                       "family": carrier.family, "carrier_metadata": carrier.metadata},
            "report": report.to_dict()}
    _write(out, tensors, config, meta, overwrite)
    return report
