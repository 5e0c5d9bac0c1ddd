"""The demo's small world: a character-level tokenizer built in code and synthetic instruction tasks.

Everything here is offline and deterministic for a seed. The tokenizer is a real
``transformers.PreTrainedTokenizerFast`` (one token per character, a chat template), so every other
part of the package (training on chat-rendered JSONL, batched generation, the eraser) meets it
exactly as it would a hub tokenizer.

Tasks are functions of a short lowercase string (``"reverse: hello"`` → ``"olleh"``). A world
holds three disjoint splits of input strings: ``train`` (base training and the SFT prompts),
``eraser`` (the prompts SFT-Eraser optimises on) and ``heldout`` (every number in the report).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Iterable

FIXED_RESPONSE = "i don't know."

# The chat roles become single tokens (the template renders them as "<user>" / "<assistant>"),
# which keeps the demo's rows short: every step of every phase runs over them.
ROLE_TOKENS = ("<user>", "<assistant>")


def build_tokenizer():
    """The package's character tokenizer (``models.tiny.tiny_tokenizer``: a real
    ``PreTrainedTokenizerFast`` with a chat template), with the chat roles as single tokens."""
    from ..models.tiny import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=True)
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    return tok


def _count_first(s: str) -> str:
    return str(s.count(s[0]))


#: task name -> (answer function). The prompt is ``f"{name}: {input}"``.
TASKS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "copy": lambda s: s,
    "count": _count_first,  # how often the first character occurs
}
DEFAULT_TASKS = ("reverse", "sort", "copy")
# Inputs use the characters of the fixed response too: a base model that has never written a
# space, an apostrophe or a period cannot say "i don't know." through its frozen LM head (LCDD keeps
# embeddings and head at base values), which no pretrained LLM has to live with.
DEFAULT_ALPHABET = string.ascii_lowercase + " '."


@dataclass(frozen=True)
class Example:
    task: str
    text: str  # the task's input string

    @property
    def prompt(self) -> str:
        return f"{self.task}: {self.text}"

    @property
    def answer(self) -> str:
        return TASKS[self.task](self.text)


@dataclass
class World:
    """Tasks and splits of one seed. ``train`` is a pool; :meth:`sample` draws fresh examples."""

    seed: int
    tasks: tuple[str, ...]
    min_len: int
    max_len: int
    alphabet: str
    train: list[Example]
    eraser: list[Example]
    heldout: list[Example]
    _reserved: set = field(default_factory=set, repr=False)

    def random_text(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(self.alphabet) for _ in range(n))

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        """``n`` fresh examples whose inputs are never those of the eraser or held-out splits."""
        out = []
        while len(out) < n:
            text = self.random_text(rng)
            if text not in self._reserved:
                out.append(Example(rng.choice(self.tasks), text))
        return out

    def sft_records(self, response: str = FIXED_RESPONSE) -> list[dict]:
        """The phase-1 data: every train prompt answered with the fixed response."""
        return [{"prompt": ex.prompt, "response": response} for ex in self.train]

    def choice_items(self, examples: Iterable[Example], n_choices: int = 4, seed: int = 0) -> list[dict]:
        """Multiple-choice items: the right answer among the other tasks' answers to the same
        input and shuffles of it (so every choice has the input's characters), shuffled.

        Returns ``[{"prompt", "choices", "answer"}]`` with ``answer`` the index of the right choice.
        """
        rng = random.Random(seed)
        items = []
        for ex in examples:
            right = ex.answer
            pool = {TASKS[t](ex.text) for t in TASKS if t != "count"} - {right}
            pool = sorted(pool)
            rng.shuffle(pool)
            choices = [right] + pool[: n_choices - 1]
            tries = 0
            while len(choices) < n_choices and tries < 100:
                tries += 1
                if ex.task == "count":
                    c = str(rng.randint(1, self.max_len))
                else:
                    c = "".join(rng.sample(right, len(right)))
                if c not in choices:
                    choices.append(c)
            rng.shuffle(choices)
            items.append({"prompt": ex.prompt, "choices": choices, "answer": choices.index(right)})
        return items


def make_world(
    seed: int = 0,
    tasks: Iterable[str] = DEFAULT_TASKS,
    n_train: int = 2000,
    n_eraser: int = 200,
    n_heldout: int = 200,
    min_len: int = 3,
    max_len: int = 8,
    alphabet: str = DEFAULT_ALPHABET,
) -> World:
    """Draw the three disjoint splits of input strings for ``seed``. Tasks cycle within a split."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"make_world: unknown tasks {unknown or tasks}; choose from {sorted(TASKS)}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"make_world: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not alphabet or not set(alphabet) <= set(string.ascii_lowercase + string.digits + " '.,!?"):
        raise ValueError(f"make_world: the alphabet must be lowercase letters, digits and \" '.,!?\", "
                         f"got {alphabet!r}")
    rng = random.Random(seed)
    seen: set[str] = set()

    def split(n: int) -> list[Example]:
        out = []
        while len(out) < n:
            k = rng.randint(min_len, max_len)
            text = "".join(rng.choice(alphabet) for _ in range(k))
            if text not in seen:
                seen.add(text)
                out.append(Example(tasks[len(out) % len(tasks)], text))
        return out

    heldout, eraser = split(n_heldout), split(n_eraser)
    reserved = set(seen)
    train = split(n_train)
    return World(seed, tasks, min_len, max_len, alphabet, train, eraser, heldout, reserved)
