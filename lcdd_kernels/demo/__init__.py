"""``lcdd demo``: the whole method end to end on a CPU (base model, SFT, LCDD, carrier, SFT-Eraser).

Modules: ``world`` (the character tokenizer and the synthetic tasks), ``base`` (phase 0: a tiny
base model trained from scratch), ``pipeline`` (the phases, the settings and the scores),
``report`` (report.json, report.md, plots).
"""

from .pipeline import PRESETS, STAGES, DemoConfig, EraserSettings, preset, run_demo
from .world import FIXED_RESPONSE, TASKS, World, build_tokenizer, make_world

__all__ = ["DemoConfig", "EraserSettings", "FIXED_RESPONSE", "PRESETS", "STAGES", "TASKS", "World",
           "build_tokenizer", "make_world", "preset", "run_demo"]
