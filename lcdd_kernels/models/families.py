"""THE table of supported model families: where the projections are and which masks they use.

Everything that patches, extracts or reads a model (``apply_lcdd``, carriers, the eraser) goes
through :data:`FAMILIES` and the helpers here; no other module names a projection path. Adding a
family with the same layout is one line in the table.

Mask groups per decoder layer (SPEC §2, in the authors' flat order) and the projections using them:

=============  ==================================================  =========================
group          rows of                                             columns of
=============  ==================================================  =========================
ffn_read       —                                                   gate_proj, up_proj
ffn_hidden     gate_proj, up_proj                                  down_proj
ffn_write      down_proj                                           —
attn_read      —                                                   q_proj, k_proj, v_proj
q / k / v      q_proj / k_proj / v_proj                            o_proj (v, GQA-expanded)
attn_write     o_proj                                              —
=============  ==================================================  =========================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: The eight mask groups of a decoder layer, in the flat order of SPEC §2 / ``l0_masks.pt``.
GROUPS = ("ffn_read", "ffn_hidden", "ffn_write", "attn_read", "q", "k", "v", "attn_write")


@dataclass(frozen=True)
class Projection:
    """One projection of a decoder layer.

    ``path`` is relative to the decoder layer (``"self_attn.q_proj"``); ``rows`` / ``cols`` name the
    mask groups of its output and input channels; ``gqa_cols`` marks o_proj, whose column mask is
    the v mask repeated for the query heads sharing each kv head (SPEC §2).
    """

    path: str
    rows: str
    cols: str
    gqa_cols: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Family:
    """How one model family lays out its decoder layers.

    ``layers``: path of the ``nn.ModuleList`` of decoder layers from the causal LM.
    ``mlp`` / ``gate`` / ``up`` / ``down``: the SwiGLU block (fused in training: gate and up share
    their masks). ``frozen``: non-decoder parameters (embeddings, final norm, lm_head) held at the
    base model's values. The config attributes give the dimensions.
    """

    name: str
    model_types: tuple[str, ...]
    projections: tuple[Projection, ...]
    layers: str = "model.layers"
    mlp: str = "mlp"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    hidden_size: str = "hidden_size"
    intermediate_size: str = "intermediate_size"
    num_heads: str = "num_attention_heads"
    num_kv_heads: str = "num_key_value_heads"
    head_dim: str = "head_dim"
    num_layers: str = "num_hidden_layers"
    hidden_act: str = "hidden_act"


_LLAMA_LAYOUT = (
    Projection("self_attn.q_proj", "q", "attn_read"),
    Projection("self_attn.k_proj", "k", "attn_read"),
    Projection("self_attn.v_proj", "v", "attn_read"),
    Projection("self_attn.o_proj", "attn_write", "v", gqa_cols=True),
    Projection("mlp.gate_proj", "ffn_hidden", "ffn_read"),
    Projection("mlp.up_proj", "ffn_hidden", "ffn_read"),
    Projection("mlp.down_proj", "ffn_write", "ffn_hidden"),
)

#: family name -> layout. Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k norms) share one layout.
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",), _LLAMA_LAYOUT),
    "mistral": Family("mistral", ("mistral",), _LLAMA_LAYOUT),
    "qwen2": Family("qwen2", ("qwen2",), _LLAMA_LAYOUT),
    "qwen3": Family("qwen3", ("qwen3",), _LLAMA_LAYOUT),
}

#: Where each group's active indices can be read from a patched model or a carrier:
#: group -> (projection path, "rows" | "cols").
GROUP_SOURCE = {
    "ffn_read": ("mlp.gate_proj", "cols"),
    "ffn_hidden": ("mlp.gate_proj", "rows"),
    "ffn_write": ("mlp.down_proj", "rows"),
    "attn_read": ("self_attn.q_proj", "cols"),
    "q": ("self_attn.q_proj", "rows"),
    "k": ("self_attn.k_proj", "rows"),
    "v": ("self_attn.v_proj", "rows"),
    "attn_write": ("self_attn.o_proj", "rows"),
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def family_of_model_type(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise ValueError(
        f"unsupported model family {model_type!r}: lcdd-kernels patches {supported()} "
        "(transformers causal LMs with the Llama layout); other architectures need an entry in "
        "lcdd_kernels/models/families.py FAMILIES"
    )


def get_family(model_or_config) -> Family:
    """The :class:`Family` of a transformers model (or its config); a clear error otherwise."""
    config = _config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"unsupported model: {type(model_or_config).__name__} has no transformers config with a "
            f"model_type; lcdd-kernels patches {supported()} causal LMs"
        )
    return family_of_model_type(model_type)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"{type(root).__name__} has no submodule {path!r}; is it a causal LM "
            f"(e.g. AutoModelForCausalLM) of a supported family ({supported()})?"
        ) from None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM, in order."""
    return get_submodule(model, get_family(model).layers)


@dataclass(frozen=True)
class Dims:
    """Dimensions that fix the mask layout (SPEC §2)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, model_or_config) -> "Dims":
        config = _config(model_or_config)
        fam = get_family(config)
        heads = int(getattr(config, fam.num_heads))
        kv = getattr(config, fam.num_kv_heads, None) or heads
        hidden = int(getattr(config, fam.hidden_size))
        head_dim = getattr(config, fam.head_dim, None) or hidden // heads
        dims = cls(int(getattr(config, fam.num_layers)), hidden, int(getattr(config, fam.intermediate_size)),
                   heads, int(kv), int(head_dim))
        if dims.num_heads % dims.num_kv_heads:
            raise ValueError(f"{fam.name}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv}")
        return dims

    @property
    def gqa_groups(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def group_sizes(self) -> dict[str, int]:
        """Length of each mask group of one layer, in :data:`GROUPS` order."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"ffn_read": d, "ffn_hidden": self.intermediate_size, "ffn_write": d, "attn_read": d,
                "q": q, "k": kv, "v": kv, "attn_write": d}

    @property
    def masks_per_layer(self) -> int:
        return sum(self.group_sizes().values())

    @property
    def num_masks(self) -> int:
        return self.num_layers * self.masks_per_layer

    def shape(self, proj: Projection) -> tuple[int, int]:
        """(N, K) = (out_features, in_features) of a projection."""
        sizes = self.group_sizes()
        k = self.num_heads * self.head_dim if proj.gqa_cols else sizes[proj.cols]
        return sizes[proj.rows], k

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def expand_gqa(v_mask: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The o_proj column mask from the v mask: each kv head's ``head_dim`` block repeated for the
    ``n_heads / n_kv`` query heads that share it. (n_kv·head_dim,) -> (n_heads·head_dim,)."""
    v = v_mask.reshape(dims.num_kv_heads, dims.head_dim)
    return v.repeat_interleave(dims.gqa_groups, dim=0).reshape(-1)


def module_paths(model_or_config) -> list[tuple[int, Projection, str]]:
    """Every patched projection as (layer index, projection, full path in the HF model), in
    layer order then table order, e.g. ``(0, q_proj, "model.layers.0.self_attn.q_proj")``."""
    fam = get_family(model_or_config)
    dims = Dims.from_config(model_or_config)
    return [(i, p, f"{fam.layers}.{i}.{p.path}") for i in range(dims.num_layers) for p in fam.projections]


def plain_linear_paths(model: nn.Module, op: str, undo: str) -> list[tuple[int, Projection, str]]:
    """:func:`module_paths`, after checking that each is still a plain ``nn.Linear``: a patcher
    refuses a model another patch holds (``undo`` tells the user how to take that one off)."""
    paths = module_paths(model)
    for _, _, path in paths:
        mod = model.get_submodule(path)
        if type(mod) is not nn.Linear:
            raise ValueError(f"{op}: {path} is a {type(mod).__name__}, not a plain nn.Linear; {undo}")
    return paths


def check_projection_shapes(model: nn.Module, dims: Dims) -> None:
    """Verify that every projection has the shape the config implies (catches odd checkpoints)."""
    for _, proj, path in module_paths(model):
        lin = get_submodule(model, path)
        weight = getattr(lin, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"{path}: expected a linear projection with a 2-D weight, got {type(lin).__name__}")
        if tuple(weight.shape) != dims.shape(proj):
            raise ValueError(f"{path}: weight has shape {tuple(weight.shape)} but the config implies "
                             f"{dims.shape(proj)}")


def sparsity_stats(active: list[dict[str, int]], dims: Dims) -> dict:
    """Active count, total and sparsity per layer and group, per group and overall.

    ``active[layer][group]`` is the number of active entries (θ > 0, or a carrier's rows/cols).
    Returns ``{"overall": {...}, "groups": {group: {...}}, "layers": [{..., "groups": {...}}]}``
    where each ``{...}`` is ``{"active", "total", "sparsity"}`` (sparsity = share switched off).
    """
    sizes = dims.group_sizes()

    def entry(a: int, n: int) -> dict:
        return {"active": int(a), "total": int(n), "sparsity": 1.0 - a / n if n else 0.0}

    layers = []
    for counts in active:
        groups = {g: entry(counts[g], sizes[g]) for g in GROUPS}
        layers.append({**entry(sum(counts[g] for g in GROUPS), dims.masks_per_layer), "groups": groups})
    per_group = {g: entry(sum(c[g] for c in active), sizes[g] * len(active)) for g in GROUPS}
    overall = entry(sum(layer["active"] for layer in layers), dims.masks_per_layer * len(active))
    return {"overall": overall, "groups": per_group, "layers": layers}
