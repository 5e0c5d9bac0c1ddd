"""Scoring one model (optionally with a trigger) on the held-out split of the toy world."""

from __future__ import annotations

from .base import render_prompt
from .behaviours import Behaviour, get_behaviour
from .world import World


class Evaluator:
    """Scores one model (optionally with a trigger) on the held-out split (SPEC §6)."""

    def __init__(self, world: World, tokenizer, max_new_tokens: int):
        self.world, self.tok, self.max_new_tokens = world, tokenizer, max_new_tokens
        self.examples = world.heldout
        self.prompts = [render_prompt(tokenizer, ex.prompt) for ex in self.examples]
        self.items = [dict(it, prompt=render_prompt(tokenizer, it["prompt"]))
                      for it in world.choice_items(self.examples, seed=world.seed)]

    def responses(self, model, trigger=None, prompts=None) -> list[str]:
        from ..eraser import generate_with_trigger

        return generate_with_trigger(model, self.tok, prompts or self.prompts, trigger,
                                     max_new_tokens=self.max_new_tokens, batch_size=64)

    def exact_match(self, model, examples) -> float:
        """Share of ``examples`` answered exactly (phase 0's validation)."""
        resp = self.responses(model, prompts=[render_prompt(self.tok, ex.prompt) for ex in examples])
        return sum(r == ex.answer for r, ex in zip(resp, examples)) / len(examples)

    def score(self, model, trigger=None, behaviour: Behaviour | None = None) -> dict:
        """Task and choice accuracy, the fixed-response rates, and ``behaviour``'s rate and scores."""
        from ..eraser import choice_accuracy

        resp = self.responses(model, trigger)
        per_task: dict[str, list[bool]] = {}
        for r, ex in zip(resp, self.examples):
            per_task.setdefault(ex.task, []).append(r == ex.answer)
        behaviour = behaviour or get_behaviour("fixed")
        own = behaviour.scores(self.examples, resp)
        return {
            **get_behaviour("fixed").scores(self.examples, resp),
            **own,
            "behaviour_rate": own[behaviour.rate_key],
            "task_accuracy": sum(sum(v) for v in per_task.values()) / len(resp),
            "task_accuracy_per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
            "choice_accuracy": choice_accuracy(model, self.items, trigger, tokenizer=self.tok, batch_size=64),
            "samples": [{"prompt": ex.prompt, "response": r} for ex, r in zip(self.examples[:6], resp[:6])],
        }
