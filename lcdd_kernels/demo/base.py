"""Phase 0 of the demo: a tiny base model trained from scratch until it solves the world's tasks.

The model is a real ``transformers`` causal LM of the chosen family, built from a config (no
download). Training draws fresh examples every step (never the eraser or held-out inputs), puts
the loss on the answer tokens, and stops early once a validation sample is solved well enough.
Each training row may start with a few random characters before the chat turn so that the model
learns to ignore what precedes a prompt, as a pretrained LLM does; SFT-Eraser later puts its
trigger exactly there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .world import World

@dataclass
class ModelSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256


def build_model(family: str, tokenizer, size: ModelSize | None = None, seed: int = 0):
    """A randomly initialised causal LM of ``family`` (``models.tiny.tiny_model`` at the demo's size)."""
    from ..models.tiny import tiny_model

    size = size or ModelSize()
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), hidden_size=size.hidden,
                       intermediate_size=size.ffn, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                       head_dim=size.hidden // size.heads, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of one user turn plus the generation prompt (what the model answers)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_batch(tokenizer, examples, prefixes=None) -> dict[str, torch.Tensor]:
    """A right-padded training batch of task examples (``train.data.encode`` + ``collate``): loss on
    the answer and its end-of-turn token; ``prefixes`` (strings) go before the turn, without loss."""
    from ..train.data import IGNORE, collate, encode

    items = []
    for i, ex in enumerate(examples):
        item = encode({"prompt": ex.prompt, "response": ex.answer}, tokenizer)
        if prefixes is not None and prefixes[i]:
            pre = tokenizer(prefixes[i], add_special_tokens=False)["input_ids"]
            item = {"input_ids": pre + item["input_ids"], "labels": [IGNORE] * len(pre) + item["labels"]}
        items.append(item)
    return collate(items, tokenizer.pad_token_id)


@dataclass
class BaseTraining:
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 50
    prefix_max: int = 16  # up to this many random characters before each training prompt
    eval_every: int = 100
    eval_size: int = 96
    target: float = 0.97  # stop once validation exact match reaches this


def train_base(model, tokenizer, world: World, cfg: BaseTraining, seed: int = 0, evaluate=None, progress=True):
    """Train ``model`` in place on fresh task examples; returns the log (list of dicts).

    ``evaluate(model, examples) -> exact match`` checks a fixed validation sample every
    ``cfg.eval_every`` steps; training stops once it reaches ``cfg.target``.
    """
    from tqdm.auto import tqdm

    rng = random.Random(seed + 1)
    val = world.sample(random.Random(seed + 2), cfg.eval_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step):  # linear warmup, cosine decay to 10%
        return min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log = []
    bar = tqdm(range(cfg.steps), desc="phase 0: base model", disable=not progress, leave=False)
    model.train()
    for step in bar:
        exs = world.sample(rng, cfg.batch)
        prefixes = None
        if cfg.prefix_max:
            prefixes = ["".join(rng.choice(world.alphabet) for _ in range(rng.randint(0, cfg.prefix_max)))
                        for _ in exs]
        batch = encode_batch(tokenizer, exs, prefixes)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        entry = {"step": step, "loss": loss.item()}
        if evaluate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            entry["val_exact_match"] = evaluate(model, val)
            model.train()
            bar.set_postfix(loss=f"{entry['loss']:.3f}", val=f"{entry['val_exact_match']:.2f}")
            log.append(entry)
            if entry["val_exact_match"] >= cfg.target:
                break
        else:
            log.append(entry)
    model.eval()
    return log
