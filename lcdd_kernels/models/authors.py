"""Import the mask checkpoints of the authors' code: ``l0_masks.pt`` (state dict with key ``theta``,
the flat layout of SPEC §2) and ``l0_config.json`` (``n_masks``, dual settings and state).

Their parametrisation (yuplin2333/sft-reverse, ``training/gated_model_simple.py``) masks only the
projection weights, ``W_final = (w_base + (row ⊗ col)·(w − w_base)).to(w.dtype)`` with a flat
Heaviside straight-through θ; norms and biases train, embed_tokens and lm_head are frozen. Patch with
``apply_lcdd(sft, base, non_projection="sft")`` (the default) to reproduce their LCDD model;
tests/helpers/lcdd_reference.py ``AuthorsLCDD`` re-states their code for the equality tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

MASKS_FILE = "l0_masks.pt"
CONFIG_FILE = "l0_config.json"


def load_authors_masks(handle, path: str | os.PathLike) -> dict:
    """Load the authors' θ into an ``apply_lcdd`` handle.

    Args:
        handle: from :func:`~lcdd_kernels.apply_lcdd` on the model the masks were trained for.
        path: a directory holding ``l0_masks.pt`` (and usually ``l0_config.json``), or the
            ``.pt`` file itself.

    Returns:
        the parsed ``l0_config.json`` (empty when absent), e.g. to restore the dual state.

    The file is read with ``torch.load(..., weights_only=True)`` (no pickle execution).
    """
    p = Path(path)
    pt = p / MASKS_FILE if p.is_dir() else p
    if not pt.is_file():
        raise FileNotFoundError(f"no {MASKS_FILE} at {p}")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file or one needing pickle: name it
        raise ValueError(f"{pt} is not a readable weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "theta" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise KeyError(f"{pt} has no 'theta' entry (found {keys}); only Heaviside masks (theta) are supported")
    theta = state["theta"]
    if not isinstance(theta, torch.Tensor):
        raise ValueError(f"{pt}: 'theta' must be a tensor, got {type(theta).__name__}")
    config = {}
    cfg_path = pt.parent / CONFIG_FILE
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is corrupt (not valid JSON: {e})") from None
        n = config.get("n_masks")
        if n is not None and n != theta.numel():
            raise ValueError(f"{cfg_path} says n_masks={n} but {pt} holds {theta.numel()} logits; "
                             "the two files come from different runs")
    handle.set_flat_theta(theta.reshape(-1) if theta.dim() == 1 else theta)
    return config
