"""Model shapes the suites measure: decoder dimensions and one layer's projections."""

from __future__ import annotations

#: Decoder dimensions from the models' Hugging Face config.json (hidden_size, intermediate_size,
#: num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers). "tiny" is for smoke tests.
MODEL_DIMS: dict[str, dict[str, int]] = {
    "qwen3-0.6b": dict(d=1024, d_ff=3072, n_heads=16, n_kv=8, head_dim=128, layers=28),
    "llama-3-8b": dict(d=4096, d_ff=14336, n_heads=32, n_kv=8, head_dim=128, layers=32),
    "tiny": dict(d=64, d_ff=96, n_heads=4, n_kv=2, head_dim=16, layers=2),
}


def projection_shapes(model: str, merge: bool = True) -> list[tuple[str, int, int]]:
    """The (names, N, K) of one decoder layer's projections (N outputs, K inputs).

    With ``merge``, projections of equal shape are merged under one name (``"k_proj/v_proj"``): they
    cost the same. Without it, all seven, in order.
    """
    try:
        m = MODEL_DIMS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_DIMS)}") from None
    q, kv = m["n_heads"] * m["head_dim"], m["n_kv"] * m["head_dim"]
    projs = [("q_proj", q, m["d"]), ("k_proj", kv, m["d"]), ("v_proj", kv, m["d"]), ("o_proj", m["d"], q),
             ("gate_proj", m["d_ff"], m["d"]), ("up_proj", m["d_ff"], m["d"]), ("down_proj", m["d"], m["d_ff"])]
    if not merge:
        return projs
    merged: dict[tuple[int, int], list[str]] = {}
    for name, n, k in projs:
        merged.setdefault((n, k), []).append(name)
    return [("/".join(names), n, k) for (n, k), names in merged.items()]
