"""Training: data, ``train_sft`` (phase 1), ``train_lcdd`` (phase 2), the Trainer callback, plots.

``LCDDCallback`` is resolved lazily: it imports ``transformers.TrainerCallback``.
"""

from .data import as_examples, collate, encode, read_jsonl
from .loop import TrainConfig, TrainResult, train_lcdd, train_sft
from .plot import plot_log

__all__ = ["LCDDCallback", "TrainConfig", "TrainResult", "as_examples", "collate", "encode", "plot_log",
           "read_jsonl", "train_lcdd", "train_sft"]


def __getattr__(name):
    if name == "LCDDCallback":
        from .callback import LCDDCallback

        return LCDDCallback
    raise AttributeError(f"module 'lcdd_kernels.train' has no attribute {name!r}")
