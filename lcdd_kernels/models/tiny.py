"""Tiny models and a character tokenizer, built in code: for tests and ``--tiny`` on a laptop.

The configs use grouped-query attention (3 query heads per kv head) and sizes that are not powers
of two, so that a wrong GQA expansion or a transposed mask shows up. Qwen3's head_dim differs from
hidden_size / num_heads, as in the real models.
"""

from __future__ import annotations

import string

import torch

#: family -> (transformers config class name, extra config fields)
TINY = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 12}),
}

_COMMON = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
               tie_word_embeddings=False)

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True):
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII (works offline)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_config(family: str, vocab_size: int | None = None, **overrides):
    """A tiny GQA config of a supported family (no downloads)."""
    import transformers

    try:
        cls_name, extra = TINY[family]
    except KeyError:
        raise ValueError(f"no tiny config for {family!r}; choose one of {', '.join(TINY)}") from None
    if vocab_size is None:
        vocab_size = len(tiny_tokenizer(chat_template=False))
    fields = {**_COMMON, **extra, "vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1,
              "eos_token_id": 2, **overrides}
    return getattr(transformers, cls_name)(**fields)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, device=None, **overrides):
    """A randomly initialised tiny causal LM; the same seed gives the same weights (per device:
    ``device`` initialises there directly, with that device's generator)."""
    import contextlib

    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    config.use_cache = False  # training; avoids allocating a KV cache in every forward
    with torch.random.fork_rng(devices=[]), (torch.device(device) if device else contextlib.nullcontext()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
