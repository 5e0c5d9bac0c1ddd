"""The Qwen3-0.6B-shaped group of ``lcdd bench serving``: vLLM without adapters, carriers served
natively by the package's plugin, and the same carriers as exact LoRA, in one run.

The model has Qwen3-0.6B's decoder layer (hidden 1024, 16 query / 8 kv heads of 128,
intermediate 3072), random weights, ``--layers`` of them (default 4), and the demo's character
vocabulary (about a hundred ids). The vocabulary is small on purpose: Qwen3-0.6B's 151,936-token
lm_head (155 M multiply-adds per token, against 15.7 M per decoder layer) would dominate a CPU
decode step and hide what the projections cost; with a small head the carriers' share of the step
is as large as it gets, the harder test of the targets.

The carriers are random: per decoder layer, each mask group keeps ``round((1 − s)·n)`` of its n
channels (s = ``--sparsity``, 0.8 by default: 20% of rows and 20% of columns of every projection),
Δ ~ N(0, 0.02²) at those rows × columns. Their exact LoRA needs rank min(|rows|, |cols|) per
module (205 at s = 0.8); where some module needs more than vLLM's 512, the LoRA row says so with
the rank instead of a measurement.
"""

from __future__ import annotations

import torch

#: Qwen3-0.6B's decoder layer; max_position_embeddings only bounds prompt + new tokens here.
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, max_position_embeddings=256, initializer_range=0.02)
#: The largest ``max_lora_rank`` vLLM accepts.
VLLM_MAX_LORA_RANK = 512
#: Standard deviation of the random Δ (the base weights' own, ``initializer_range``).
DELTA_STD = 0.02
#: The carriers: seeds of carriers 0..3 (native-1 serves carrier 0; native-4 and lora-4 cycle through all).
CARRIER_SEEDS = (1, 2, 3, 4)


def group_name(layers: int, sparsity: float) -> str:
    return f"serving/qwen3-0.6b-shape/{layers}-layers/s={sparsity:g}"


def check_options(layers: int, sparsity: float, new_tokens: int, prompt_tokens: int = 32) -> None:
    """The group's options, refused before anything is built."""
    if layers < 1:
        raise ValueError(f"lcdd bench serving: --layers {layers}: the model needs at least one decoder layer")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"lcdd bench serving: --sparsity {sparsity}: give the fraction of each mask group that is "
                         "off, in [0, 1)")
    room = QWEN3_06B["max_position_embeddings"] - prompt_tokens
    if new_tokens > room:
        raise ValueError(f"lcdd bench serving: --new-tokens {new_tokens}: the served models hold "
                         f"{QWEN3_06B['max_position_embeddings']} positions, prompts up to {prompt_tokens}; "
                         f"ask for at most {room}")


def served_model(layers: int, seed: int = 0):
    """(model, tokenizer): the Qwen3-0.6B-shaped model with ``layers`` decoder layers, random
    weights for ``seed``, the demo's character tokenizer."""
    from ..demo.world import build_tokenizer
    from ..models.tiny import tiny_model

    check_options(layers, 0.0, 1)
    tok = build_tokenizer()
    model = tiny_model("qwen3", seed=seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_hidden_layers=layers,
                       **QWEN3_06B)
    model.config.use_cache = True
    return model.eval(), tok


def random_carrier(model, sparsity: float, seed: int):
    """A carrier of ``model`` (its base fingerprint) with random masks and Δ: per layer, every
    mask group keeps ``round((1 − sparsity)·n)`` of its n channels, drawn without replacement; o_proj's
    columns are the v mask expanded over the query heads (as LCDD's masks are shared)."""
    from ..carriers.carrier import Carrier, CarrierModule
    from ..carriers.extract import base_fingerprint
    from ..models.families import GROUPS, Dims, expand_gqa, get_family, module_paths

    check_options(1, sparsity, 1)
    dims = Dims.from_config(model)
    g = torch.Generator().manual_seed(seed)
    sizes = dims.group_sizes()
    masks = []
    for _ in range(dims.num_layers):
        layer = {}
        for name in GROUPS:
            n = sizes[name]
            keep = max(1, round((1.0 - sparsity) * n))
            layer[name] = torch.randperm(n, generator=g)[:keep].sort().values
        masks.append(layer)
    modules = {}
    for layer, proj, path in module_paths(model):
        rows, cols = masks[layer][proj.rows], masks[layer][proj.cols]
        if proj.gqa_cols:
            on = torch.zeros(dims.num_kv_heads * dims.head_dim, dtype=torch.bool)
            on[cols] = True
            cols = torch.nonzero(expand_gqa(on, dims)).flatten()
        delta = torch.randn(rows.numel(), cols.numel(), generator=g) * DELTA_STD
        modules[path] = CarrierModule(rows.to(torch.int32), cols.to(torch.int32), delta)
    return Carrier(modules, get_family(model).name, dims, torch.float32, base_fingerprint(model),
                   metadata={"made_by": "lcdd bench serving (random masks and deltas)", "sparsity": sparsity})


def exact_rank(carrier) -> tuple[int, str]:
    """The largest exact LoRA rank of the carrier's modules, min(|rows|, |cols|), and that module."""
    return max((min(m.rows.numel(), m.cols.numel()), path) for path, m in carrier.modules.items())


def runs(prompts, lora_rank: int | None, new_tokens: int, batches) -> list[dict]:
    """The vLLM runs of the group: ``base`` (LoRA off), ``native`` (carrier directories ``n0..n3``:
    every request on n0, then requests cycling through all four) and, with ``lora_rank``, ``lora``
    (the exact LoRA ``l0..l3``, the same cycling). Each LoRA engine has one slot per carrier of its
    mix (no request without an adapter shares their batch) and ``max_lora_rank`` 8 for the native
    path (carriers use none of it) or the exact rank's. ``batches(requests, new_tokens, prefix)``
    gives a request list's timed batches."""
    n = len(CARRIER_SEEDS)

    def reqs(adapter):
        return [{"prompt_token_ids": p, "adapter": adapter(i)} for i, p in enumerate(prompts)]

    out = [{"name": "qwen3-base", "enable_lora": False, "max_loras": 1,
            "batches": batches(reqs(lambda i: None), new_tokens)},
           {"name": "qwen3-native", "enable_lora": True, "max_lora_rank": 8, "max_loras": n,
            "batches": batches(reqs(lambda i: "n0"), new_tokens, "one-")
            + batches(reqs(lambda i: f"n{i % n}"), new_tokens, "mixed-")}]
    if lora_rank is not None:
        out.append({"name": "qwen3-lora", "enable_lora": True, "max_lora_rank": lora_rank, "max_loras": n,
                    "batches": batches(reqs(lambda i: f"l{i % n}"), new_tokens, "mixed-")})
    return out


#: provider -> (run, batch prefix, carriers, mix)
PROVIDERS = {
    "vllm-base": ("qwen3-base", "", 0, "none"),
    "vllm-native-1": ("qwen3-native", "one-", 1, "carrier 0"),
    "vllm-native-4": ("qwen3-native", "mixed-", 4, "0..3 cycled"),
    "vllm-lora-4": ("qwen3-lora", "mixed-", 4, "0..3 cycled"),
}
