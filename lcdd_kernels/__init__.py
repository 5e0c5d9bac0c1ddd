"""lcdd-kernels: fused kernels and tools for LCDD carriers (the equations: docs/spec.md).

Everything public is re-exported here. Names are resolved lazily from the table below, so that
``import lcdd_kernels`` stays cheap and never imports transformers, Triton or the compiled
extension until they are used, and never touches a GPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # backends
    "set_backend": "._backend",
    "use_backend": "._backend",
    # training ops (SPEC §1)
    "masked_delta_linear": ".ops.masked_delta",
    "masked_delta_swiglu": ".ops.masked_delta",
    "masked_delta_linear_ref": ".ops.masked_delta",
    "masked_delta_swiglu_ref": ".ops.masked_delta",
    "effective_weight": ".ops.masked_delta",
    # masks and the dual controller (SPEC §2, §3)
    "HeavisideMask": ".masks",
    "heaviside_st": ".masks",
    "DualController": ".dual",
    # activation capture (SPEC §5); the eraser itself lives in lcdd_kernels.eraser
    "gather_channels": ".ops.gather",
    "capture": ".eraser.capture",
    "carrier_channels": ".eraser.capture",
    # Hugging Face patching (SPEC §2) and carriers (SPEC §4)
    "apply_lcdd": ".models.patch",
    "LCDDHandle": ".models.patch",
    "load_authors_masks": ".models.authors",
    "get_family": ".models.families",
    "decoder_layers": ".models.families",
    "Carrier": ".carriers.carrier",
    "CarrierModule": ".carriers.carrier",
    "extract_carrier": ".carriers.extract",
    "load_carrier": ".carriers.load",
    "base_fingerprint": ".carriers.extract",
    "apply_carrier": ".carriers.apply",
    "export_peft": ".carriers.export",
    # signed carriers and atomic writes
    "sign_carrier": ".carriers.signing",
    "verify_carrier": ".carriers.signing",
    "CarrierSignatureError": ".carriers.signing",
    "publish_dir": ".atomic",
    "write_file_atomic": ".atomic",
    # training (SPEC §3)
    "train_sft": ".train.loop",
    "train_lcdd": ".train.loop",
    "TrainConfig": ".train.loop",
    "LCDDCallback": ".train.callback",
    # carrier inference (SPEC §4): fused ops, many carriers per batch, merge / unmerge
    "carrier_linear": ".ops.carrier",
    "bank_linear": ".ops.carrier",
    "CarrierPlan": ".ops.carrier_plan",
    "CarrierBank": ".carriers.bank",
    "apply_carrier_bank": ".carriers.bank",
    "merge_carrier_": ".carriers.merge",
    "unmerge_carrier_": ".carriers.merge",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'lcdd_kernels' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for static tools only
    from ._backend import set_backend, use_backend  # noqa: F401
    from .dual import DualController  # noqa: F401
    from .eraser.capture import capture, carrier_channels  # noqa: F401
    from .carriers.apply import apply_carrier  # noqa: F401
    from .carriers.export import export_peft  # noqa: F401
    from .carriers.bank import CarrierBank, apply_carrier_bank  # noqa: F401
    from .carriers.merge import merge_carrier_, unmerge_carrier_  # noqa: F401
    from .carriers.carrier import Carrier, CarrierModule  # noqa: F401
    from .carriers.extract import base_fingerprint, extract_carrier  # noqa: F401
    from .carriers.load import load_carrier  # noqa: F401
    from .carriers.signing import CarrierSignatureError, sign_carrier, verify_carrier  # noqa: F401
    from .atomic import publish_dir, write_file_atomic  # noqa: F401
    from .masks import HeavisideMask, heaviside_st  # noqa: F401
    from .ops.carrier import bank_linear, carrier_linear  # noqa: F401
    from .ops.carrier_plan import CarrierPlan  # noqa: F401
    from .models.authors import load_authors_masks  # noqa: F401
    from .models.families import decoder_layers, get_family  # noqa: F401
    from .models.patch import LCDDHandle, apply_lcdd  # noqa: F401
    from .train.callback import LCDDCallback  # noqa: F401
    from .train.loop import TrainConfig, train_lcdd, train_sft  # noqa: F401
    from .ops.gather import gather_channels  # noqa: F401
    from .ops.masked_delta import (  # noqa: F401
        effective_weight,
        masked_delta_linear,
        masked_delta_linear_ref,
        masked_delta_swiglu,
        masked_delta_swiglu_ref,
    )
