"""What one tensor-parallel rank's vLLM LoRA layer computes of a projection: its output rows
(column-parallel layers) or its input columns (row-parallel layers).

Each rank keeps only its own part of a carrier: the carrier rows that fall in its output slice
(shifted to the rank's local rows) with all columns, or the carrier columns that fall in its input
slice (shifted to local columns) with all rows. The mapping is vLLM 0.32.0's own slicing of a LoRA
adapter (``slice_lora_b`` / ``slice_lora_a`` in ``vllm/lora/layers/column_parallel_linear.py`` and
``row_parallel_linear.py``), so a carrier is split exactly as that rank's base weight is:

- ``MergedColumnParallelLinearWithLoRA`` (gate/up) and ``MergedQKVParallelLinearWithLoRA``
  (q/k/v): part ``i`` holds rows ``[id_i·s_i, (id_i + 1)·s_i)`` of that part at local offset
  ``s_0 + … + s_{i−1}``, with ``s = output_slices`` and ``id = output_ids`` (q: the rank; k and v:
  ``rank // num_kv_head_replicas``, so when there are fewer kv heads than ranks, the ranks sharing a
  kv head each hold its rows);
- ``QKVParallelLinearWithLoRA`` (a fused qkv with one adapter weight), ``ColumnParallelLinearWithLoRA``
  over a two-part merged layer, and a plain ``ColumnParallelLinearWithLoRA``: the segments that
  their ``slice_lora_b`` cuts out;
- ``RowParallelLinearWithLoRA`` (o, down): input columns ``[rank·K_r, (rank + 1)·K_r)`` with
  ``K_r = input_size`` (the layer's per-rank width), every output row. Its partial product is added
  to the rank's partial output before vLLM's all-reduce, which sums the ranks' shares once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, start + length)`` of packed part ``part``, at local rows ``[local, local + length)``."""

    part: int
    start: int
    length: int
    local: int


@dataclass(frozen=True)
class ShardView:
    """One rank's view of a (fused) projection: the output ``segments`` it computes, its output
    width ``n_out``, and its input columns ``[in_start, in_start + in_size)`` (``in_size`` None:
    every column)."""

    segments: tuple[Segment, ...]
    n_out: int
    in_start: int = 0
    in_size: int | None = None
    #: one segment per part covering the whole part (no output split): row bounds can be checked
    whole: bool = False


def _classes(module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def _side_by_side(sizes, starts=None) -> tuple[Segment, ...]:
    out, local = [], 0
    for i, size in enumerate(sizes):
        out.append(Segment(i, 0 if starts is None else starts[i], size, local))
        local += size
    return tuple(out)


def shard_view(module, parts: list[str], name: str) -> ShardView:
    """The rank's view of vLLM LoRA layer ``module`` (``name``) that fuses ``parts``; a ValueError
    when its kind of tensor-parallel split is not one the plugin knows."""
    slices = tuple(int(s) for s in getattr(module, "output_slices", ()))
    tp = int(getattr(module, "tp_size", 1) or 1)
    rank = int(getattr(module, "tp_rank", 0) or 0)
    classes = _classes(module)
    n_out = sum(slices)
    if tp == 1 or "ReplicatedLinearWithLoRA" in classes:
        if len(slices) != len(parts):
            raise ValueError(f"vLLM's {name} has output slices {list(slices)} for the parts {parts}")
        return ShardView(_side_by_side(slices), n_out, whole=True)
    if "RowParallelLinearWithLoRA" in classes:
        if len(parts) != 1 or len(slices) != 1:
            raise ValueError(f"vLLM's row-parallel {name} has output slices {list(slices)} for the parts {parts}")
        k = int(module.input_size)  # the per-rank width (vLLM sets it to input_size_per_partition)
        return ShardView(_side_by_side(slices), n_out, in_start=rank * k, in_size=k)
    if "ColumnParallelLinearWithLoRA" not in classes:
        raise ValueError(f"vLLM's {name} is a {type(module).__name__} split over {tp} tensor-parallel ranks, a "
                         "layer whose split the lcdd vLLM plugin does not know; serve carriers with "
                         "tensor_parallel_size=1 for this model")
    ids = getattr(module, "output_ids", None)
    if ids is not None:  # MergedColumnParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA
        if len(slices) != len(parts) or len(ids) != len(slices):
            raise ValueError(f"vLLM's {name} has output slices {list(slices)} for the parts {parts}")
        return ShardView(_side_by_side(slices, [int(i) * s for i, s in zip(ids, slices)]), n_out)
    if len(parts) != 1 or len(slices) != 1:
        raise ValueError(f"vLLM's {name} has output slices {list(slices)} for the parts {parts}")
    if "QKVParallelLinearWithLoRA" in classes:  # one adapter weight over q, k, v side by side
        base = module.base_layer
        q, kv = int(module.q_proj_shard_size), int(module.kv_proj_shard_size)
        q_total, kv_total = int(module.q_proj_total_size), int(module.kv_proj_total_size)
        kv_id = rank // int(base.num_kv_head_replicas)
        return ShardView((Segment(0, q * rank, q, 0), Segment(0, q_total + kv * kv_id, kv, q),
                          Segment(0, q_total + kv_total + kv * kv_id, kv, q + kv)), n_out)
    if getattr(module, "is_merged_col_linear", False):  # a two-part merged layer with one adapter weight
        half = slices[0] // 2
        total = sum(int(s) for s in module.base_layer.output_sizes)
        return ShardView((Segment(0, half * rank, half, 0), Segment(0, total // 2 + half * rank, half, half)), n_out)
    return ShardView((Segment(0, slices[0] * rank, slices[0], 0),), n_out)
