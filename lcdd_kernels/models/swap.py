"""Swapping modules in and out of a model by path, with a real undo (no hooks, no leftovers)."""

from __future__ import annotations

from torch import nn

from .families import get_submodule


class ModuleSwaps:
    """Records module replacements in ``root`` so that :meth:`undo` puts the originals back.

    ``swap(path, new)`` installs ``new`` at ``path`` and returns the module it replaced.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.originals: dict[str, nn.Module] = {}

    def swap(self, path: str, new: nn.Module) -> nn.Module:
        old = get_submodule(self.root, path)
        self.originals.setdefault(path, old)
        self.root.set_submodule(path, new)
        return old

    def current(self, path: str) -> nn.Module:
        return get_submodule(self.root, path)

    def undo(self) -> nn.Module:
        for path, old in self.originals.items():
            self.root.set_submodule(path, old)
        self.originals = {}
        return self.root
