"""Batched greedy generation with an optional soft trigger prepended to every prompt (SPEC §6)."""

from __future__ import annotations

import torch

from .layout import build_rows, token_lists

__all__ = ["generate_with_trigger"]

OP = "generate_with_trigger"


def _pad_and_eos(model, tokenizer):
    gen = getattr(model, "generation_config", None)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and gen is not None:
        eos = gen.eos_token_id
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return (0 if pad is None else pad), eos


@torch.no_grad()
def generate_with_trigger(model, tokenizer, prompts, trigger: torch.Tensor | None = None,
                          max_new_tokens: int = 128, batch_size: int = 16, return_ids: bool = False,
                          progress: bool = False):
    """Greedy responses to ``prompts``, each row laid out as padding, trigger, prompt.

    Args:
        model: a causal LM (with the carrier on, or not).
        tokenizer: tokenizes string prompts and decodes the responses (may be None when prompts
            are token ids and ``return_ids=True``).
        prompts: strings or token-id lists (already chat-formatted if the model expects that).
        trigger: (L, D) soft prompt from :func:`optimize_eraser` / :func:`load_trigger`, or None.
        max_new_tokens: response budget (SPEC §6: 128).
        batch_size: prompts per ``generate`` call.
        return_ids: return lists of new token ids (up to and including EOS) instead of strings.

    Returns:
        one response per prompt, in order: decoded strings (special tokens skipped), or id lists.
    """
    from tqdm.auto import tqdm

    if not return_ids and tokenizer is None:
        raise ValueError(f"{OP}: pass a tokenizer to decode the responses (or return_ids=True)")
    if max_new_tokens < 1:
        raise ValueError(f"{OP}: max_new_tokens must be >= 1, got {max_new_tokens}")
    seqs = token_lists(OP, prompts, tokenizer)
    if trigger is not None and trigger.shape[-1] != model.config.hidden_size:
        raise ValueError(f"{OP}: trigger has width {trigger.shape[-1]}, the model's hidden size is "
                         f"{model.config.hidden_size}; it was optimised for another model")
    pad, eos = _pad_and_eos(model, tokenizer)
    eos_set = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    emb = model.get_input_embeddings()
    out: list = []
    for s in tqdm(range(0, len(seqs), batch_size), desc="generate", disable=not progress):
        rows = build_rows(emb, seqs[s:s + batch_size], trigger, padding="left", pad_id=pad)
        # generate() derives position ids from the attention mask (cumsum - 1): 0 at the trigger.
        new = model.generate(inputs_embeds=rows.inputs_embeds, attention_mask=rows.attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=eos, use_cache=True)
        for ids in new.tolist():
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos_set), len(ids))
            out.append(ids[:cut])
    if return_ids:
        return out
    return tokenizer.batch_decode(out, skip_special_tokens=True)
