"""Trigger files: ``trigger.safetensors`` (the (L, D) soft prompt and the channels it matched) plus
``trigger.json`` (the model's fingerprint, the channel kind, the options, the loss curves).

A trigger reverses only the model it was optimised against, so loading one for a model checks the
fingerprint and refuses a mismatch with a message that says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..carriers.extract import fingerprint_tensors
from .eraser import EraserResult

__all__ = ["save_trigger", "load_trigger", "trigger_metadata", "model_fingerprint"]

FORMAT = "lcdd-trigger/1"
WEIGHTS_NAME = "trigger.safetensors"
META_NAME = "trigger.json"


def model_fingerprint(model) -> str:
    """``"sha256:…"`` over every parameter and buffer of ``model`` as it computes now: a dense
    model's weights; a base model with ``apply_carrier`` (its carrier rows, columns and deltas
    count, marked off when the carrier is disabled); a model under ``apply_lcdd`` (W, B and θ)."""
    off = {name for name, m in model.named_modules() if getattr(m, "enabled", True) is False}

    def named():
        for name, t in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]):
            owner = name.rpartition(".")[0]
            yield (f"{name}[off]" if owner in off else name), t

    return fingerprint_tensors(named())


def _dims(model) -> dict:
    cfg = model.config
    return {"model_type": getattr(cfg, "model_type", None), "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_hidden_layers}


def save_trigger(directory: str | os.PathLike, result: EraserResult, model, overwrite: bool = False) -> Path:
    """Write ``result`` into ``directory`` for ``model`` (the LCDD model it was optimised against).

    Refuses to replace an existing trigger unless ``overwrite=True``. The directory is published
    atomically and durably (:func:`lcdd_kernels.atomic.publish_dir`): a crash leaves the whole old
    trigger or the whole new one; other files already in ``directory`` are kept.
    """
    from safetensors.torch import save_file

    from .. import __version__

    from ..atomic import overwrite_guard, publish_dir

    d = Path(directory)
    conflict = overwrite_guard(d, (WEIGHTS_NAME, META_NAME), "trigger", overwrite)
    if result.trigger.shape[-1] != model.config.hidden_size:
        raise ValueError(f"save_trigger: the trigger has width {result.trigger.shape[-1]} but the model's "
                         f"hidden size is {model.config.hidden_size}; is this the model it was optimised for?")
    tensors = {"trigger": result.trigger.detach().float().cpu().contiguous()}
    tensors.update({f"channels.{layer}": idx.long().cpu().contiguous() for layer, idx in result.channels.items()})
    meta = {
        "format": FORMAT,
        "model_fingerprint": model_fingerprint(model),
        "model": _dims(model),
        "trigger_length": int(result.trigger.shape[0]),
        "channels_kind": result.channels_kind,
        "channels_per_layer": {str(k): int(v.numel()) for k, v in result.channels.items()},
        "options": dataclasses.asdict(result.options),
        "best_loss": result.best_loss,
        "best_step": result.best_step,
        "curves": result.curves,
        "lcdd_kernels_version": __version__,
    }
    owned = {n for name in (WEIGHTS_NAME, META_NAME) for n in (name, f".{name}.tmp")}
    with publish_dir(d, conflict=conflict, owned=owned) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return d


def trigger_metadata(directory: str | os.PathLike) -> dict:
    """The content of ``trigger.json``, validated."""
    path = Path(directory) / META_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {META_NAME}; is it a directory written by save_trigger "
                                "(lcdd erase --out)?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the trigger file is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trigger file of format {FORMAT!r}")
    return meta


def load_trigger(directory: str | os.PathLike, model=None, allow_fingerprint_mismatch: bool = False) -> torch.Tensor:
    """The (L, D) float32 trigger saved in ``directory``.

    With ``model``, it is checked to be the model the trigger was optimised against (same
    fingerprint, hence same dimensions) and moved to its device; a mismatch raises ValueError
    unless ``allow_fingerprint_mismatch=True`` (dimensions must still agree).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = trigger_metadata(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: {META_NAME} is there but {WEIGHTS_NAME} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read the trigger ({e}); the file is corrupt") from None
    trigger = tensors.get("trigger")
    want = (meta["trigger_length"], meta["model"]["hidden_size"])
    if trigger is None or tuple(trigger.shape) != want or not trigger.is_floating_point():
        got = None if trigger is None else tuple(trigger.shape)
        raise ValueError(f"{path}: expected a float 'trigger' of shape {want} (per {META_NAME}), got {got}")
    if model is None:
        return trigger
    mine = _dims(model)
    if mine["hidden_size"] != want[1]:
        raise ValueError(f"{directory}: this trigger is for a model with hidden size {want[1]} "
                         f"({meta['model']['model_type']}); this model has {mine['hidden_size']}")
    if not allow_fingerprint_mismatch:
        fp = model_fingerprint(model)
        if fp != meta["model_fingerprint"]:
            raise ValueError(
                f"{directory}: this trigger was optimised for another model (fingerprint "
                f"{meta['model_fingerprint'][:19]}…, {meta['model']}); this model's is {fp[:19]}…. A trigger "
                "reverses only the model it was optimised against: load the same model (with the same "
                "carrier applied), or pass allow_fingerprint_mismatch=True (CLI: --allow-fingerprint-mismatch) "
                "to use it anyway")
    return trigger.to(model.get_input_embeddings().weight.device)
