"""Batched rows with a soft trigger (SPEC §5): padding, then the trigger, then the sequence.

Every row of a batch is laid out so that it computes exactly what the row alone would: the trigger
sits directly before the row's first token, position ids start at 0 on the trigger, and the
attention mask hides the padding. With left padding (the default) every row ends in the last
column, so "the last k tokens" are the same k columns for the whole batch and the LM head can be
run on those columns only (``logits_to_keep=k``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Rows", "build_rows", "token_lists"]


@dataclass
class Rows:
    """One padded batch.

    Attributes:
        inputs_embeds: (B, S, D) in the embedding's dtype.
        attention_mask: (B, S) int64, 1 on the trigger and the sequence.
        position_ids: (B, S) int64, 0 at the trigger's first vector (at the sequence's first
            token when there is no trigger).
        lengths: (B,) int64 sequence lengths (trigger excluded).
        starts: (B,) int64 column of each row's first real entry (trigger or token).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    starts: torch.Tensor

    def model_kwargs(self) -> dict:
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": False}


def token_lists(op: str, seqs, tokenizer=None, add_special_tokens: bool = True,
                allow_empty: bool = False) -> list[torch.Tensor]:
    """Strings (tokenized with ``tokenizer``) or token-id sequences -> list of 1-D int64 tensors."""
    if isinstance(seqs, (str, torch.Tensor)) or not isinstance(seqs, Sequence):
        raise TypeError(f"{op}: pass a list of strings or of token-id lists, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{op}: the prompt list is empty; pass at least one prompt")
    out = []
    for i, s in enumerate(seqs):
        if isinstance(s, str):
            if tokenizer is None:
                raise ValueError(f"{op}: prompts are strings; pass tokenizer= to tokenize them")
            ids = tokenizer(s, add_special_tokens=add_special_tokens)["input_ids"]
            t = torch.as_tensor(ids, dtype=torch.int64)
        else:
            t = torch.as_tensor(s).to(torch.int64).reshape(-1)
        if t.numel() == 0 and not allow_empty:
            raise ValueError(f"{op}: sequence {i} is empty (no tokens); remove it")
        out.append(t)
    return out


def build_rows(embedding: torch.nn.Module, seqs: list[torch.Tensor], trigger: torch.Tensor | None,
               padding: str = "left", pad_id: int = 0) -> Rows:
    """Lay out ``trigger ⊕ seq`` for each sequence in one padded batch.

    Args:
        embedding: the model's input embedding (``model.get_input_embeddings()``).
        seqs: B 1-D int64 token tensors of any lengths.
        trigger: (L, D) soft prompt (any float dtype and device, cast to the embedding's; gradients
            flow back to it), or None.
        padding: "left" or "right".
        pad_id: token id embedded at padding columns (masked out; any valid id).
    """
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    weight = embedding.weight
    device = weight.device
    n_trig = 0 if trigger is None else trigger.shape[0]
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)
    n_s = int(lengths.max()) + n_trig
    starts = n_s - n_trig - lengths if padding == "left" else torch.zeros_like(lengths)
    tokens = torch.full((len(seqs), n_s), pad_id, dtype=torch.int64)
    for b, s in enumerate(seqs):
        at = int(starts[b]) + n_trig
        tokens[b, at:at + s.numel()] = s
    lengths, starts = lengths.to(device), starts.to(device)
    rel = torch.arange(n_s, device=device)[None, :] - starts[:, None]  # column relative to row start
    embeds = embedding(tokens.to(device))
    if n_trig:
        # One gather from [T ⊕ this row's embeddings]: each output column reads its own source
        # column, so the backward scatter never adds twice into one place and T's gradient is the
        # expand's ordered sum over rows. Indexing T directly with a (B, S) table instead made its
        # gradient an accumulating index_put_, atomic on a multi-threaded CPU: triggers differed
        # from run to run (measured in the demo).
        n_b, _, n_d = embeds.shape
        trig = trigger.to(device=device, dtype=embeds.dtype)
        both = torch.cat([trig.expand(n_b, n_trig, n_d), embeds], dim=1)
        cols = torch.arange(n_s, device=device)[None, :]
        src = torch.where((rel >= 0) & (rel < n_trig), rel, cols + n_trig)
        embeds = both.gather(1, src[..., None].expand(n_b, n_s, n_d))
    mask = ((rel >= 0) & (rel < n_trig + lengths[:, None])).long()
    return Rows(embeds, mask, rel.clamp(min=0), lengths, starts)
