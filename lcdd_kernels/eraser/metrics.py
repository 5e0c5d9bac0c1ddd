"""How reversal is scored (SPEC §6): fixed-response rate, teacher-forced KL, multiple-choice accuracy."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .eraser import wide
from .layout import build_rows, token_lists

__all__ = ["FIXED_PHRASES", "fixed_response_rate", "kl_benchmark", "choice_accuracy", "choice_scores", "continuation_logprobs"]

#: SPEC §6: a response "is" the fixed response when it contains one of these (case-insensitive).
FIXED_PHRASES = ("i don't know", "i do not know", "i'm not sure", "i am not sure")


def fixed_response_rate(responses: Sequence[str], phrases: Sequence[str] = FIXED_PHRASES,
                        max_words: int = 40) -> dict[str, float]:
    """Share of responses that give the fixed response ("I don't know.").

    ``strict`` (the paper's): contains one of ``phrases`` (case-insensitive; curly apostrophes
    count as straight ones) and has at most ``max_words`` whitespace-separated words.
    ``loose``: contains one of ``phrases``, any length (a response that says "I don't know" and
    then answers anyway counts here but not in ``strict``).

    Returns {"strict": fraction, "loose": fraction, "n": number of responses}.
    """
    if isinstance(responses, str) or len(responses) == 0:
        raise ValueError("fixed_response_rate: pass a non-empty list of response strings")
    lowered = [p.lower() for p in phrases]
    loose = strict = 0
    for r in responses:
        text = r.lower().replace("\u2019", "'")
        if any(p in text for p in lowered):
            loose += 1
            strict += len(r.split()) <= max_words
    n = len(responses)
    return {"strict": strict / n, "loose": loose / n, "n": n}


def continuation_logprobs(model, prefixes: list[torch.Tensor], continuations: list[torch.Tensor],
                          trigger: torch.Tensor | None = None, batch_size: int = 8
                          ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Teacher-forced log-probabilities of each continuation given its prefix (and the trigger).

    Yields, per batch of rows ``sl``: log-probs (B, M, V) float32 (float64 for a float64 model),
    where ``[b, j]`` is the distribution that predicts continuation token j of row b, and a
    (B, M) bool mask of real continuation tokens. The LM head runs on the last M + 1 columns only.
    """
    emb = model.get_input_embeddings()
    for s in range(0, len(prefixes), batch_size):
        sl = slice(s, s + batch_size)
        seqs = [torch.cat([p, c]) for p, c in zip(prefixes[sl], continuations[sl])]
        m_len = torch.tensor([c.numel() for c in continuations[sl]])
        n_m = int(m_len.max())
        rows = build_rows(emb, seqs, trigger, padding="left")
        # with left padding row b's continuation is its last m_b columns; column -1 predicts nothing
        logits = model(**rows.model_kwargs(), logits_to_keep=n_m + 1).logits[:, :-1]
        logp = wide(logits).log_softmax(-1)
        # right-align -> left-align: continuation token j of row b sits at column n_m - m_b + j
        cols = (n_m - m_len)[:, None] + torch.arange(n_m)[None, :]
        mask = torch.arange(n_m)[None, :] < m_len[:, None]
        idx = cols.clamp(max=n_m - 1).to(logp.device)
        logp = logp.gather(1, idx[..., None].expand(-1, -1, logp.shape[-1]))
        yield sl, logp, mask.to(logp.device)


def _texts_or_ids(op, items, tokenizer, special):
    return token_lists(op, items, tokenizer, add_special_tokens=special, allow_empty=not special)


@torch.no_grad()
def kl_benchmark(model_a, model_b, prompts, references, trigger_b: torch.Tensor | None = None,
                 tokenizer=None, batch_size: int = 8, trigger_a: torch.Tensor | None = None) -> float:
    """Mean full-vocabulary KL(p_a ‖ p_b) over the reference response tokens, teacher-forced.

    SPEC §6: the references are the SFT model's greedy answers to held-out prompts; KL(SFT ‖ LCDD)
    small means the behaviour is kept, KL(Base ‖ LCDD + trigger) small means it is reverted.
    ``prompts`` / ``references``: strings (with ``tokenizer``; prompts get the tokenizer's special
    tokens, references none) or token ids. The mean is over all response tokens pooled.
    """
    op = "kl_benchmark"
    pre = _texts_or_ids(op, prompts, tokenizer, True)
    cont = _texts_or_ids(op, references, tokenizer, False)
    if len(pre) != len(cont):
        raise ValueError(f"{op}: {len(pre)} prompts but {len(cont)} references; pass one reference per prompt")
    if model_a.config.vocab_size != model_b.config.vocab_size:
        raise ValueError(f"{op}: the models have different vocabularies ({model_a.config.vocab_size} vs "
                         f"{model_b.config.vocab_size})")
    keep = [i for i, c in enumerate(cont) if c.numel()]
    if not keep:
        raise ValueError(f"{op}: every reference is empty; there is no response token to compare")
    pre, cont = [pre[i] for i in keep], [cont[i] for i in keep]
    total, count = 0.0, 0
    stream_b = continuation_logprobs(model_b, pre, cont, trigger_b, batch_size)
    for (_, la, mask), (_, lb, _) in zip(continuation_logprobs(model_a, pre, cont, trigger_a, batch_size), stream_b):
        kl = F.kl_div(lb.to(la.device), la, log_target=True, reduction="none").sum(-1)  # (B, M)
        total += float(kl[mask].double().sum())
        count += int(mask.sum())
    return total / count


@torch.no_grad()
def choice_scores(model, items: Sequence[dict], trigger: torch.Tensor | None = None, tokenizer=None,
                  batch_size: int = 16, length_normalize: bool = False) -> list[torch.Tensor]:
    """Log-likelihood score of every choice of every item (see :func:`choice_accuracy`).

    Returns one float64 tensor of shape (n_choices,) per item.
    """
    op = "choice_accuracy"
    if len(items) == 0:
        raise ValueError(f"{op}: the item list is empty")
    pre, cont, sizes = [], [], []
    for i, it in enumerate(items):
        try:
            prompt, choices, answer = it["prompt"], it["choices"], int(it["answer"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{op}: item {i} must be a dict with 'prompt', 'choices' and an int 'answer'") from None
        if not 0 <= answer < len(choices):
            raise ValueError(f"{op}: item {i} has answer {answer} but {len(choices)} choices")
        p = _texts_or_ids(op, [prompt], tokenizer, True)[0]
        cs = token_lists(op, list(choices), tokenizer, add_special_tokens=False)
        pre += [p] * len(cs)
        cont += cs
        sizes.append(len(cs))
    scores = torch.empty(len(cont), dtype=torch.float64)
    for sl, logp, mask in continuation_logprobs(model, pre, cont, trigger, batch_size):
        ids = torch.zeros(mask.shape, dtype=torch.long)
        for b, c in enumerate(cont[sl]):
            ids[b, : c.numel()] = c
        tok = torch.where(mask, logp.gather(-1, ids.to(logp.device)[..., None])[..., 0], 0.0)
        s = tok.sum(1).double().cpu()
        scores[sl] = s / mask.sum(1).cpu() if length_normalize else s
    return list(scores.split(sizes))


def choice_accuracy(model, items: Sequence[dict], trigger: torch.Tensor | None = None, tokenizer=None,
                    batch_size: int = 16, length_normalize: bool = False) -> float:
    """Multiple-choice accuracy by log-likelihood (SPEC §6: MMLU, HellaSwag).

    Each item is ``{"prompt": str | ids, "choices": [str | ids, ...], "answer": int}``. A choice's
    score is the sum of its tokens' log-probabilities given the (trigger and) prompt, the mean per
    token with ``length_normalize=True``; the prediction is the highest score (first on ties).
    All (item, choice) pairs run batched, LM head on the choice tokens only.
    """
    scores = choice_scores(model, items, trigger, tokenizer, batch_size, length_normalize)
    correct = sum(int(s.argmax()) == int(it["answer"]) for s, it in zip(scores, items))
    return correct / len(items)
