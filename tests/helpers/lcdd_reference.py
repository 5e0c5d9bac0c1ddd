"""An independent LCDD model written from SPEC §1–§3 literally, for the model-level tests.

It shares nothing with lcdd_kernels' patching: it takes a plain (unpatched) Hugging Face model whose
non-projection parameters are the base's, builds every ``W_eff = B + (r cᵀ) ⊙ (W − B)`` densely from
leaf tensors ``W`` and ``θ`` with the mask value ``1[θ>0] − σ(θ).detach() + σ(θ)``, and runs the
model with ``torch.func.functional_call``.
"""

from __future__ import annotations

import torch

# SPEC §2, in order: name, length as a function of the config.
SPEC_GROUPS = ["ffn_read", "ffn_hidden", "ffn_write", "attn_read", "q", "k", "v", "attn_write"]
# projection (relative to a decoder layer) -> (row group, column group)
SPEC_PROJECTIONS = {
    "self_attn.q_proj": ("q", "attn_read"),
    "self_attn.k_proj": ("k", "attn_read"),
    "self_attn.v_proj": ("v", "attn_read"),
    "self_attn.o_proj": ("attn_write", "v*"),  # v expanded over the query heads of each kv head
    "mlp.gate_proj": ("ffn_hidden", "ffn_read"),
    "mlp.up_proj": ("ffn_hidden", "ffn_read"),
    "mlp.down_proj": ("ffn_write", "ffn_hidden"),
}


def config_dims(config):
    heads = config.num_attention_heads
    kv = config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, kv, hd


def group_lengths(config) -> list[int]:
    _, d, dff, heads, kv, hd = config_dims(config)
    return [d, dff, d, d, heads * hd, kv * hd, kv * hd, d]


def spec_mask(theta: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(theta)
    return (theta > 0).to(theta.dtype) - s.detach() + s


def layer_masks(theta_flat: torch.Tensor, config, layer: int) -> dict[str, torch.Tensor]:
    lengths = group_lengths(config)
    per = sum(lengths)
    parts = torch.split(theta_flat[layer * per:(layer + 1) * per], lengths)
    masks = {name: spec_mask(t) for name, t in zip(SPEC_GROUPS, parts)}
    _, _, _, heads, kv, hd = config_dims(config)
    masks["v*"] = masks["v"].view(kv, hd).repeat_interleave(heads // kv, dim=0).reshape(-1)
    return masks


def projection_names(config) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(config.num_hidden_layers) for p in SPEC_PROJECTIONS]


class SpecLCDD:
    """The reference LCDD model: ``W`` (dict of leaf tensors), ``B`` (frozen), ``theta`` (flat leaf)."""

    def __init__(self, plain_model, sft_state: dict, base_state: dict, theta: torch.Tensor):
        self.model = plain_model
        for p in self.model.parameters():
            p.requires_grad_(False)
        names = projection_names(plain_model.config)
        self.W = {n: sft_state[f"{n}.weight"].detach().clone().requires_grad_(True) for n in names}
        self.B = {n: base_state[f"{n}.weight"].detach().clone() for n in names}
        self.theta = theta.detach().clone().requires_grad_(True)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        out = {}
        for i in range(cfg.num_hidden_layers):
            m = layer_masks(self.theta, cfg, i)
            for proj, (rg, cg) in SPEC_PROJECTIONS.items():
                n = f"model.layers.{i}.{proj}"
                out[f"{n}.weight"] = self.B[n] + torch.outer(m[rg], m[cg]) * (self.W[n] - self.B[n])
        return out

    def __call__(self, **batch):
        return torch.func.functional_call(self.model, self.effective_weights(), args=(), kwargs=batch)

    def l0(self) -> torch.Tensor:
        return torch.sigmoid(self.theta).sum()


def train_non_projection(plain_model, names) -> list:
    """Make the named parameters of ``plain_model`` trainable leaves (SPEC §3: in the authors' recipe
    norms and projection biases keep training during LCDD); returns them."""
    params = dict(plain_model.named_parameters())
    return [params[n].requires_grad_(True) for n in names]


class AuthorsLCDD:
    """A re-statement of the authors' parametrisation (yuplin2333/sft-reverse,
    ``training/gated_model_simple.py`` ``L0Masks`` / ``DualWeightMasking`` and
    ``training/hard_concrete.py`` ``HeavisideSTEMask``), written for these tests:

    - one flat θ for the whole model; per layer the groups ffn_read, ffn_hidden, ffn_write,
      attn_read, q, k, v, attn_write are consecutive slices (their ``_get_layer_masks``);
    - mask value ``active − σ(θ).detach() + σ(θ)`` in training, ``active`` in eval, with
      ``active = (θ > 0).float()``;
    - each projection weight gets a ``torch.nn.utils.parametrize`` parametrisation
      ``(w_base + (row ⊗ col) · (w − w_base)).to(w.dtype)`` with rows/cols as in their table and the
      o_proj column mask the v mask repeated per kv group (their ``_expand_kv_mask``);
    - the model is the SFT model as it is: norms and biases keep their SFT values and train;
      embed_tokens and lm_head are frozen (SPEC §3).
    """

    def __init__(self, sft_model, base_state: dict, theta: torch.Tensor):
        import torch.nn.utils.parametrize as P
        from torch import nn

        self.model = sft_model
        self.theta = nn.Parameter(theta.detach().clone().float() if theta.dtype != torch.float64
                                  else theta.detach().clone())
        cfg = sft_model.config
        for n, p in sft_model.named_parameters():
            p.requires_grad_(not (n.startswith("model.embed_tokens") or n.startswith("lm_head")))
        lengths = group_lengths(cfg)
        per = sum(lengths)
        _, _, _, heads, kv, hd = config_dims(cfg)
        owner = self

        def getter(layer, group):
            def get():
                active = (owner.theta > 0.0).to(owner.theta.dtype)
                if owner.model.training:
                    s = torch.sigmoid(owner.theta)
                    all_masks = active - s.detach() + s
                else:
                    all_masks = active
                g = SPEC_GROUPS.index(group.rstrip("*"))
                off = layer * per + sum(lengths[:g])
                m = all_masks[off:off + lengths[g]]
                if group == "v*":
                    m = m.view(kv, hd).repeat_interleave(heads // kv, dim=0).reshape(-1)
                return m
            return get

        class DualWeightMasking(nn.Module):
            def __init__(self, w_base, row, col):
                super().__init__()
                self.register_buffer("w_base", w_base.clone())
                self.row, self.col = row, col

            def forward(self, w):
                mask = self.row().view(-1, 1) * self.col().view(1, -1)
                return (self.w_base + mask * (w - self.w_base)).to(w.dtype)

        for i in range(cfg.num_hidden_layers):
            for proj, (rg, cg) in SPEC_PROJECTIONS.items():
                name = f"model.layers.{i}.{proj}"
                P.register_parametrization(sft_model.get_submodule(name), "weight",
                                           DualWeightMasking(base_state[f"{name}.weight"], getter(i, rg), getter(i, cg)))

    def __call__(self, **batch):
        return self.model(**batch)

    def weight(self, name: str) -> torch.Tensor:
        """The trainable SFT weight W of a projection (the parametrisation's ``original``)."""
        return self.model.get_submodule(name).parametrizations.weight.original
