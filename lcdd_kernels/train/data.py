"""SFT data: JSONL of ``{"prompt", "response"}`` or chat ``{"messages": [...]}``, tokenized with the
model's chat template when it has one, with the loss on response tokens only by default."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

IGNORE = -100


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Examples from a JSON-lines file; blank lines are skipped, a bad line is named."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    out = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from None
            if not isinstance(ex, dict):
                raise ValueError(f"{p}:{n}: each line must be a JSON object, got {type(ex).__name__}")
            out.append(ex)
    if not out:
        raise ValueError(f"{p} holds no examples")
    return out


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def _messages(ex: dict) -> list[dict]:
    if "messages" in ex:
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError("'messages' must be a list of {'role', 'content'} objects")
        return msgs
    if "prompt" in ex and "response" in ex:
        return [{"role": "user", "content": str(ex["prompt"])}, {"role": "assistant", "content": str(ex["response"])}]
    raise ValueError(f"an example needs 'prompt' and 'response', or 'messages'; got keys {sorted(ex)}")


def encode(ex: dict, tokenizer, max_length: int = 512, train_on_prompt: bool = False) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one example; labels are IGNORE outside assistant turns
    (unless ``train_on_prompt``). Chat template when the tokenizer has one; otherwise
    ``bos? + prompt + response + eos`` with prompt and response tokenized separately."""
    msgs = _messages(ex)
    ids: list[int] = []
    labels: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        done = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prefix = _ids(tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True))
            upto = _ids(tokenizer.apply_chat_template(msgs[:i + 1], tokenize=True))
            if upto[:len(prefix)] != prefix or prefix[:done] != ids[:done]:
                raise ValueError("the chat template does not render conversations as growing prefixes; "
                                 "pre-tokenize the data (input_ids/labels) instead")
            ids.extend(prefix[done:])
            labels.extend(prefix[done:] if train_on_prompt else [IGNORE] * (len(prefix) - done))
            ids.extend(upto[len(prefix):])
            labels.extend(upto[len(prefix):])
            done = len(upto)
    else:
        for m in msgs:
            part = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
            if m["role"] == "assistant":
                part = part + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            ids.extend(part)
            labels.extend(part if (m["role"] == "assistant" or train_on_prompt) else [IGNORE] * len(part))
        if tokenizer.bos_token_id is not None:
            ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    if not any(lab != IGNORE for lab in labels):
        raise ValueError("an example has no response tokens to train on")
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def as_examples(data, tokenizer=None, max_length: int = 512, train_on_prompt: bool = False) -> list[dict]:
    """Tokenized examples from a JSONL path, a list of raw examples, or already tokenized ones
    (dicts with ``input_ids`` and ``labels``, lists or 1-D tensors)."""
    if isinstance(data, (str, os.PathLike)):
        data = read_jsonl(data)
    data = list(data)
    if not data:
        raise ValueError("no training examples")
    out = []
    for n, ex in enumerate(data):
        if "input_ids" in ex:
            ids = [int(i) for i in torch.as_tensor(ex["input_ids"]).tolist()]
            labels = [int(i) for i in torch.as_tensor(ex.get("labels", ids)).tolist()]
            if len(ids) != len(labels):
                raise ValueError(f"example {n}: input_ids and labels differ in length")
            out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
            continue
        if tokenizer is None:
            raise ValueError("raw (prompt/response or messages) examples need a tokenizer")
        try:
            out.append(encode(ex, tokenizer, max_length, train_on_prompt))
        except ValueError as e:
            raise ValueError(f"example {n}: {e}") from None
    return out


def collate(items: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples to ``input_ids`` / ``attention_mask`` / ``labels`` (B, T)."""
    t = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), t), pad_id, dtype=torch.long)
    labels = torch.full((len(items), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), t), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.as_tensor(x["input_ids"])
        labels[i, :n] = torch.as_tensor(x["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(examples: list[dict], batch_size: int, seed: int, shuffle: bool, start_epoch: int = 0,
                  start_index: int = 0) -> Iterable[tuple[int, int, list[dict]]]:
    """Endless (epoch, index in epoch, examples) micro-batches; epoch e is shuffled with seed + e, so a
    run resumed at (epoch, index) sees exactly the batches it would have seen."""
    epoch, index = start_epoch, start_index
    n = len(examples)
    per_epoch = max(1, n // batch_size)
    while True:
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(n))
        while index < per_epoch:
            yield epoch, index, [examples[j] for j in order[index * batch_size:(index + 1) * batch_size]]
            index += 1
        epoch, index = epoch + 1, 0
