"""Recognising and validating a carrier directory given to vLLM as a LoRA adapter path.

A directory is a carrier when it holds ``carrier_config.json`` (what :meth:`Carrier.save` writes
last); anything else stays vLLM's (a PEFT LoRA). A carrier is checked with the package's own
:func:`~lcdd_kernels.load_carrier` (every field, index and SHA-256) and against the served base:
its family and dimensions against the model's config, its base fingerprint against the projection
weights in the model's checkpoint files (hashed once per model, as
:func:`~lcdd_kernels.base_fingerprint` hashes a loaded model). Carriers with dense parts (format
2: norms, biases that SFT changed) are refused, naming them: the plugin serves projections only.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ...carriers.carrier import Carrier
from ...carriers.extract import fingerprint_tensors
from ...carriers.layout import CONFIG_NAME, projection_paths
from ...carriers.load import load_carrier
from ...models.families import Dims, get_family


class CarrierRefused(ValueError):
    """A carrier that the served model cannot take; the message says why and what to do."""


def is_carrier_dir(path) -> bool:
    """Whether a LoRA adapter path is a carrier directory (it holds ``carrier_config.json``)."""
    try:
        return Path(path, CONFIG_NAME).is_file()
    except (TypeError, OSError):
        return False


def _model_dir(model: str) -> Path:
    d = Path(model)
    if d.is_dir():
        return d
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))


@functools.lru_cache(maxsize=4)
def checkpoint_fingerprint(model: str) -> str:
    """The base fingerprint of a Hugging Face checkpoint directory (or a cached hub id): its
    projection weights hashed from the safetensors files, in the model's module order."""
    from safetensors import safe_open
    from transformers import AutoConfig

    d = _model_dir(model)
    config = AutoConfig.from_pretrained(d)
    fam, dims = get_family(config), Dims.from_config(config)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise CarrierRefused(f"the served model {model} has no safetensors files to check a carrier's base "
                                 "fingerprint against; save it with safe_serialization=True")
        where = {}
        for f in files:
            with safe_open(f, "pt") as h:
                where.update({k: f.name for k in h.keys()})

    def weights():
        handles = {}
        try:
            for _, _, path in projection_paths(fam, dims.num_layers):
                key = f"{path}.weight"
                if key not in where:
                    raise CarrierRefused(f"the served model's checkpoint {d} has no tensor {key!r}; the plugin cannot "
                                         "check a carrier's base fingerprint against it")
                f = where[key]
                if f not in handles:
                    handles[f] = safe_open(d / f, "pt")
                yield path, handles[f].get_tensor(key)
        finally:
            handles.clear()

    return fingerprint_tensors(weights())


#: A PEM public key: when set, every carrier must be signed by its private key
#: (``lcdd sign``); unsigned, differently signed or edited carriers are refused at load.
VERIFY_ENV = "LCDD_VLLM_VERIFY_KEY"


def load_for_model(path, model: str, hf_config) -> Carrier:
    """The carrier at ``path``, validated for the served ``model`` (its path or hub id, and its
    Hugging Face config); a :class:`CarrierRefused` (or the loader's ValueError) naming the problem.
    With ``LCDD_VLLM_VERIFY_KEY`` set to a public key, its signature is checked too."""
    try:
        carrier = load_carrier(path, verify=os.environ.get(VERIFY_ENV) or None)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CarrierRefused(f"carrier {path}: {e}") from e
    fam = get_family(hf_config)
    if carrier.family != fam.name:
        raise CarrierRefused(f"carrier {path} is for a {carrier.family} model but the served model {model} is a "
                             f"{fam.name} model")
    dims = Dims.from_config(hf_config)
    if carrier.dims != dims:
        raise CarrierRefused(f"carrier {path} is for dims {carrier.dims.to_dict()} but the served model {model} has "
                             f"{dims.to_dict()}")
    if carrier.dense:
        names = sorted(carrier.dense)
        raise CarrierRefused(
            f"carrier {path} has {len(names)} dense parts ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): "
            "norm weights or biases that its fine-tuning changed, which the vLLM plugin does not serve (it serves "
            "projections only); serve it with the package's CarrierBank, or get a carrier without them by training "
            "and extracting with the base's norms and biases frozen (apply_lcdd(..., non_projection='base'); CLI: "
            "lcdd train-lcdd / lcdd extract --non-projection base)")
    fp = checkpoint_fingerprint(os.fspath(model))
    if fp != carrier.base_fingerprint:
        raise CarrierRefused(
            f"carrier {path}: base model mismatch: it was made against base weights with fingerprint "
            f"{carrier.base_fingerprint} (name: {carrier.base_name}) but the served model {model} has projection "
            f"weights with fingerprint {fp}; serve it on its own base model")
    return carrier
