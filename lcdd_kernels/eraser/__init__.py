"""SFT-Eraser (SPEC §5, §6): activation capture, trigger optimisation, generation and scores.

Modules: ``capture`` (channel capture, ``carrier_channels``), ``layout`` (padding + trigger +
prompt rows), ``eraser`` (the loss and ``optimize_eraser``), ``trigger_file`` (save / load),
``generate`` (batched greedy with a trigger), ``metrics`` (fixed-response rate, KL, accuracy).

``capture`` and ``carrier_channels`` are re-exported at the top level (``lcdd_kernels.capture``);
this package does not re-export the function ``capture``, so that ``lcdd_kernels.eraser.capture``
stays the module.
"""

from .capture import CHANNEL_KINDS, carrier_channels
from .eraser import EraserOptions, EraserResult, optimize_eraser
from .generate import generate_with_trigger
from .metrics import FIXED_PHRASES, choice_accuracy, choice_scores, fixed_response_rate, kl_benchmark
from .trigger_file import load_trigger, model_fingerprint, save_trigger, trigger_metadata

__all__ = [
    "CHANNEL_KINDS", "carrier_channels",
    "EraserOptions", "EraserResult", "optimize_eraser",
    "generate_with_trigger",
    "FIXED_PHRASES", "choice_accuracy", "choice_scores", "fixed_response_rate", "kl_benchmark",
    "load_trigger", "model_fingerprint", "save_trigger", "trigger_metadata",
]
