"""``lcdd demo``: the whole method end to end on a CPU (base model, SFT, LCDD, carrier, SFT-Eraser).

Modules: ``world`` (the character tokenizer and the synthetic tasks), ``behaviours`` (what SFT
teaches: fixed, refusal, style; their scores), ``base`` (phase 0: a tiny base model trained from
scratch), ``shipped`` (the base model shipped as package data), ``pipeline`` (the phases, the
settings and the scores), ``seeds`` (several seeds and their summary), ``stats`` (t-intervals,
paired t-test), ``report`` (report.json, report.md, plots).
"""

from .behaviours import BEHAVIOURS, Behaviour, get_behaviour
from .config import PRESETS, STAGES, DemoConfig, EraserSettings, preset
from .pipeline import run_demo
from .world import FIXED_RESPONSE, TASKS, World, build_tokenizer, make_world

__all__ = ["BEHAVIOURS", "Behaviour", "DemoConfig", "EraserSettings", "FIXED_RESPONSE", "PRESETS", "STAGES",
           "TASKS", "World", "build_tokenizer", "get_behaviour", "make_world", "preset", "run_demo"]
