"""The vLLM plugin under tensor parallelism, without vLLM: each rank's slot entries (what
:func:`slots.fuse` keeps for that rank) added to that rank's input give exactly that rank's share
of the whole carrier's contribution, in float64.

The reference is the unsharded carrier applied as a dense ΔW, then cut the way vLLM 0.32.0 cuts a
dense LoRA B (column-parallel: ``slice_lora_b`` of ``MergedColumnParallelLinearWithLoRA``,
``MergedQKVParallelLinearWithLoRA``, ``QKVParallelLinearWithLoRA``) or A (row-parallel:
``RowParallelLinearWithLoRA.slice_lora_a``), written out here from vLLM's code, independently of
the plugin's :mod:`~lcdd_kernels.integrations.vllm.shards`. Column-parallel shards, put side by side
(and, where ranks share a kv head, each equal to that head's rows), give the whole output;
row-parallel shards summed (vLLM's all-reduce) give the whole output.
"""

from __future__ import annotations

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels.carriers.validate import expand_gqa_indices
from lcdd_kernels.integrations.vllm.slots import fuse
from lcdd_kernels.models.families import FAMILIES, Dims
from lcdd_kernels.ops.carrier import carrier_linear_ref

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


# ----- stand-ins for vLLM 0.32.0's LoRA layers: the attributes fuse reads, set as vLLM's
# constructors set them (vllm/lora/layers/column_parallel_linear.py, row_parallel_linear.py,
# vllm/model_executor/layers/linear.py QKVParallelLinear) --------------------------------------


class _Layer:
    def __init__(self, tp, rank, input_size, output_slices):
        self.tp_size, self.tp_rank, self.input_size = tp, rank, input_size
        self.output_slices = tuple(output_slices)
        self.device = torch.device("cpu")


class ColumnParallelLinearWithLoRA(_Layer):
    is_merged_col_linear = False


class MergedColumnParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    pass


class MergedQKVParallelLinearWithLoRA(MergedColumnParallelLinearWithLoRA):
    pass


class QKVParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    pass


class RowParallelLinearWithLoRA(_Layer):
    pass


class _Base:
    pass


def _kv_split(dims, tp):
    """QKVParallelLinear: kv heads per rank and how many ranks share one."""
    if tp >= dims.num_kv_heads:
        return 1, tp // dims.num_kv_heads
    return dims.num_kv_heads // tp, 1


def vllm_layers(dims: Dims, tp: int, rank: int, fused_qkv_one_weight: bool = False) -> dict:
    h, i, hd = dims.hidden_size, dims.intermediate_size, dims.head_dim
    nh = dims.num_heads // tp
    nkv, replicas = _kv_split(dims, tp)
    out = {}
    for layer in range(dims.num_layers):
        p = f"model.layers.{layer}."
        if fused_qkv_one_weight:
            qkv = QKVParallelLinearWithLoRA(tp, rank, h, ((nh + 2 * nkv) * hd,))
            qkv.q_proj_shard_size, qkv.kv_proj_shard_size = nh * hd, nkv * hd
            qkv.q_proj_total_size, qkv.kv_proj_total_size = dims.num_heads * hd, dims.num_kv_heads * hd
            qkv.base_layer = _Base()
            qkv.base_layer.num_kv_head_replicas = replicas
        else:
            qkv = MergedQKVParallelLinearWithLoRA(tp, rank, h, (nh * hd, nkv * hd, nkv * hd))
            qkv.output_ids = (rank, rank // replicas, rank // replicas)
        out[p + "self_attn.qkv_proj"] = qkv
        out[p + "self_attn.o_proj"] = RowParallelLinearWithLoRA(tp, rank, dims.num_heads * hd // tp, (h,))
        gate_up = MergedColumnParallelLinearWithLoRA(tp, rank, h, (i // tp, i // tp))
        gate_up.output_ids = (rank, rank)
        out[p + "mlp.gate_up_proj"] = gate_up
        out[p + "mlp.down_proj"] = RowParallelLinearWithLoRA(tp, rank, i // tp, (h,))
    return out


# ----- vLLM's slicing of a dense LoRA weight, transcribed (the reference) ----------------------


def vllm_slice_b(full: torch.Tensor, parts: list[int], dims: Dims, tp: int, rank: int) -> torch.Tensor:
    """``slice_lora_b`` of a fused column-parallel layer on rows ``full`` (the parts side by side)."""
    if len(parts) == 3:  # q, k, v: MergedQKVParallelLinearWithLoRA (and QKVParallelLinearWithLoRA)
        nkv, replicas = _kv_split(dims, tp)
        q_shard, kv_shard = dims.num_heads // tp * dims.head_dim, nkv * dims.head_dim
        kv_id = rank // replicas
        q_total, kv_total = parts[0], parts[1]
        return torch.cat([full[q_shard * rank:q_shard * (rank + 1)],
                          full[q_total + kv_shard * kv_id:q_total + kv_shard * (kv_id + 1)],
                          full[q_total + kv_total + kv_shard * kv_id:q_total + kv_total + kv_shard * (kv_id + 1)]])
    shards, off = [], 0
    for size in parts:  # gate, up: MergedColumnParallelLinearWithLoRA
        s = size // tp
        shards.append(full[off + s * rank:off + s * (rank + 1)])
        off += size
    return torch.cat(shards)


def random_carrier(dims: Dims, on: float, seed: int) -> L.Carrier:
    """A llama carrier of ``dims`` with about ``on`` of every mask's entries active, float64 Δ."""
    gen = torch.Generator().manual_seed(seed)
    fam = FAMILIES["llama"]
    sizes = dims.group_sizes()
    modules = {}
    for layer in range(dims.num_layers):
        idx = {g: torch.nonzero(torch.rand(n, generator=gen) < on).flatten().to(torch.int32) for g, n in sizes.items()}
        for proj in fam.projections:
            rows = idx[proj.rows]
            cols = expand_gqa_indices(idx[proj.cols], dims).to(torch.int32) if proj.gqa_cols else idx[proj.cols]
            delta = torch.randn(rows.numel(), cols.numel(), generator=gen, dtype=torch.float64)
            modules[f"{fam.layers}.{layer}.{proj.path}"] = L.CarrierModule(rows, cols, delta)
    return L.Carrier(modules, "llama", dims, torch.float64, "sha256:" + "0" * 64)


def dense_delta(carrier, path, dims) -> torch.Tensor:
    proj = next(p for p in FAMILIES["llama"].projections if path.endswith(p.path))
    m = carrier.modules[path]
    w = torch.zeros(dims.shape(proj), dtype=torch.float64)
    w[m.rows.long()[:, None], m.cols.long()[None, :]] = m.delta
    return w


def shard_out(entries, name, layer_mod, x) -> torch.Tensor:
    """What the rank's slot adds for its input ``x`` (zeros where it holds no entry)."""
    n = sum(layer_mod.output_slices)
    e = entries.get(name)
    if e is None:
        return torch.zeros(x.shape[0], n, dtype=torch.float64)
    return carrier_linear_ref(x, torch.zeros(n, layer_mod.input_size, dtype=torch.float64), e.delta,
                              e.rows.long(), e.cols.long())


SHAPES = {
    # name: (dims, tensor-parallel sizes): heads and widths that vLLM can split over each size
    "gqa-odd-widths": (Dims(2, 20, 36, 8, 2, 6), (1, 2, 4)),  # tp 4: a kv head shared by 2 ranks
    "gqa-more-kv": (Dims(1, 28, 44, 12, 4, 5), (1, 2, 4)),
    "mha": (Dims(1, 24, 52, 4, 4, 7), (1, 2, 4)),
    "kv-replicated-4x": (Dims(1, 16, 24, 8, 1, 3), (2, 4)),  # one kv head held by every rank
}


def _numel(entries, name):
    e = entries.get(name)
    return 0 if e is None else e.delta.numel()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_rank_adds_its_share_of_the_carrier_exactly(shape):
    dims, tps = SHAPES[shape]
    carrier = random_carrier(dims, 0.4, seed=len(shape))
    gen = torch.Generator().manual_seed(3)
    t = 5
    for tp in tps:
        ranks = [(vllm_layers(dims, tp, r), r) for r in range(tp)]
        fused = [fuse(carrier, layers, PACKED, torch.float64, f"rank {r}").entries for layers, r in ranks]
        nkv, replicas = _kv_split(dims, tp)
        for layer in range(dims.num_layers):
            p = f"model.layers.{layer}."
            x = torch.randn(t, dims.hidden_size, generator=gen, dtype=torch.float64)
            for name, parts, local in (
                    ("self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"],
                     [dims.num_heads // tp * dims.head_dim, nkv * dims.head_dim, nkv * dims.head_dim]),
                    ("mlp.gate_up_proj", ["gate_proj", "up_proj"], [dims.intermediate_size // tp] * 2)):
                prefix = p + name.split(".")[0]
                ws = [dense_delta(carrier, f"{prefix}.{q}", dims) for q in parts]
                full = x @ torch.cat(ws).t()
                got = [shard_out(entries, p + name, layers[p + name], x) for entries, (layers, _) in zip(fused, ranks)]
                for r, g in enumerate(got):
                    want = vllm_slice_b(full.t(), [w.shape[0] for w in ws], dims, tp, r).t()
                    torch.testing.assert_close(g, want, rtol=0, atol=1e-12, msg=f"tp {tp} rank {r} {p + name}")
                held = sum(_numel(entries, p + name) for entries in fused)
                mods = [carrier.modules[f"{prefix}.{q}"].delta.numel() for q in parts]
                if replicas == 1 or name.startswith("mlp"):
                    # the ranks' slices of each part, side by side, are the whole output; each Δ entry held once
                    whole = torch.cat([torch.cat([g.split(local, dim=1)[i] for g in got], dim=1)
                                       for i in range(len(parts))], dim=1)
                    torch.testing.assert_close(whole, full, rtol=0, atol=1e-12, msg=f"tp {tp} {p + name}")
                    assert held == sum(mods), f"tp {tp} {p + name}: the ranks hold {held} Δ entries, not {sum(mods)}"
                else:  # each kv head's rows held by each of the `replicas` ranks that compute it
                    assert held == mods[0] + replicas * (mods[1] + mods[2]), f"tp {tp} {p + name}"
            for name, width in (("self_attn.o_proj", dims.num_heads * dims.head_dim),
                                ("mlp.down_proj", dims.intermediate_size)):
                xin = torch.randn(t, width, generator=gen, dtype=torch.float64)
                k = width // tp
                total = sum(shard_out(entries, p + name, layers[p + name], xin[:, r * k:(r + 1) * k])
                            for entries, (layers, r) in zip(fused, ranks))  # vLLM's all-reduce: summed once
                want = xin @ dense_delta(carrier, p + name, dims).t()
                torch.testing.assert_close(total, want, rtol=0, atol=1e-12, msg=f"tp {tp} {p + name}")
                held = sum(_numel(entries, p + name) for entries in fused)
                assert held == carrier.modules[p + name].delta.numel(), f"tp {tp} {p + name}: {held} Δ entries held"


def _rows_held(view, part_offsets) -> torch.Tensor:
    """The global rows (of the parts side by side) a rank computes, in its local order."""
    local = torch.full((view.n_out,), -1, dtype=torch.int64)
    for seg in view.segments:
        local[seg.local:seg.local + seg.length] = part_offsets[seg.part] + seg.start + torch.arange(seg.length)
    return local


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shard_rows_are_vllms_slicing_for_every_column_parallel_kind(shape):
    """Row for row, each kind of column-parallel layer (q/k/v and gate/up as separate adapter
    weights, or as one; a plain column-parallel layer) computes the rows vLLM's ``slice_lora_b``
    gives it."""
    from lcdd_kernels.integrations.vllm.shards import shard_view

    dims, tps = SHAPES[shape]
    q, kv, i = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.intermediate_size
    for tp in tps:
        for r in range(tp):
            layers = vllm_layers(dims, tp, r)
            one = vllm_layers(dims, tp, r, fused_qkv_one_weight=True)["model.layers.0.self_attn.qkv_proj"]
            merged_one = ColumnParallelLinearWithLoRA(tp, r, dims.hidden_size, (2 * i // tp,))
            merged_one.is_merged_col_linear, merged_one.base_layer = True, _Base()
            merged_one.base_layer.output_sizes = [i, i]
            plain = ColumnParallelLinearWithLoRA(tp, r, dims.hidden_size, (i // tp,))
            cases = [(layers["model.layers.0.self_attn.qkv_proj"], ["q", "k", "v"], [0, q, q + kv], [q, kv, kv]),
                     (layers["model.layers.0.mlp.gate_up_proj"], ["gate", "up"], [0, i], [i, i]),
                     (one, ["qkv"], [0], [q, kv, kv]),
                     (merged_one, ["gate_up"], [0], [i, i]),
                     (plain, ["up"], [0], None)]
            for layer, parts, offsets, sizes in cases:
                view = shard_view(layer, parts, "test")
                got = _rows_held(view, offsets)
                everything = torch.arange(sum(sizes) if sizes else i)
                want = everything[r * (i // tp):(r + 1) * (i // tp)] if sizes is None else \
                    vllm_slice_b(everything, sizes, dims, tp, r)
                assert torch.equal(got, want), f"tp {tp} rank {r} {type(layer).__name__} {parts}: {got} != {want}"
            row = shard_view(layers["model.layers.0.mlp.down_proj"], ["down"], "test")
            want = (0, None) if tp == 1 else (r * i // tp, i // tp)  # tp 1: every input column
            assert (row.in_start, row.in_size, row.n_out) == (*want, dims.hidden_size)


def test_an_unknown_split_and_fully_sharded_layers_are_refused():
    dims = SHAPES["mha"][0]
    carrier = random_carrier(dims, 0.4, seed=0)
    layers = vllm_layers(dims, 2, 0)
    odd = type("SomeOtherLinearWithLoRA", (_Layer,), {})(2, 0, dims.hidden_size, (dims.intermediate_size // 2,) * 2)
    layers["model.layers.0.mlp.gate_up_proj"] = odd
    with pytest.raises(ValueError, match="SomeOtherLinearWithLoRA split over 2 tensor-parallel ranks.*"
                                         "tensor_parallel_size=1"):
        fuse(carrier, layers, PACKED, torch.float64, "c")
    layers = vllm_layers(dims, 2, 1)
    sharded = type("RowParallelLinearWithShardedLoRA", (RowParallelLinearWithLoRA,), {})
    layers["model.layers.0.mlp.down_proj"].__class__ = sharded
    with pytest.raises(ValueError, match="fully-sharded-loras"):
        fuse(carrier, layers, PACKED, torch.float64, "c")


def test_pipeline_parallel_and_fully_sharded_loras_are_refused_naming_them():
    from types import SimpleNamespace as NS

    from lcdd_kernels.integrations.vllm.patches import _parallel_refusal

    def config(tp=1, pp=1, fully_sharded=False):
        return NS(parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                  lora_config=NS(fully_sharded_loras=fully_sharded))

    assert _parallel_refusal(config()) is None and _parallel_refusal(config(tp=4)) is None
    why = _parallel_refusal(config(tp=2, pp=2))
    assert why and "pipeline_parallel_size=1 only (this engine: 2)" in why and "tensor_parallel_size" in why
    why = _parallel_refusal(config(tp=2, fully_sharded=True))
    assert why and "--fully-sharded-loras" in why
