"""Masked-delta projection, training: dense vs parametrize vs lcdd (forward/backward/full).

Placeholder until the suite lands: it raises so that nobody mistakes it for a result.
"""


def add_arguments(p) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)


def run(args) -> int:
    raise NotImplementedError("lcdd bench training is being written")
