"""Greedy generation with the package's own CarrierBank, request by request as a server sees them:
the reference the vLLM check compares against, and the package side of ``lcdd bench serving``."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def bank_greedy(model, bank, prompts: list[list[int]], carriers: list, max_new_tokens: int, pad_id: int,
                logprobs: bool = True) -> tuple[list[list[int]], list[list[float]] | None]:
    """One ``generate`` over the whole batch, sequence i with carrier ``carriers[i]`` (an id,
    name or None). Never stops at EOS (as vLLM with ``ignore_eos``). Returns per request the new
    token ids and, with ``logprobs``, each one's log-probability under the raw logits."""
    ids, mask = (t.to(model.device) for t in left_pad(prompts, pad_id))
    with bank.carriers(list(carriers)):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=None, do_sample=False, eos_token_id=None, pad_token_id=pad_id,
                             use_cache=True, return_dict_in_generate=True, output_logits=logprobs)
    new = out.sequences[:, ids.shape[1]:]
    tokens = new.tolist()
    if not logprobs:
        return tokens, None
    steps = torch.stack(out.logits, dim=1).double().log_softmax(-1)  # (batch, new tokens, vocab)
    lps = steps.gather(-1, new[..., None]).squeeze(-1)
    return tokens, lps.tolist()
