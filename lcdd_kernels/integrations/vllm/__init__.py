"""Carriers served natively inside vLLM: the ``vllm.general_plugins`` entry point ``lcdd``.

With the package installed next to vLLM, vLLM calls :func:`register` in every process it starts
(the front end, the engine core, each worker). On the supported vLLM version it teaches vLLM's
LoRA path to take a directory written by :meth:`~lcdd_kernels.Carrier.save` wherever it takes a
LoRA adapter path (``LoRARequest(name, id, DIR)``, ``--lora-modules name=DIR``): the carrier is
validated with :func:`~lcdd_kernels.load_carrier` when the request arrives, held in a LoRA slot as
its own rows, columns and Δ, and each projection adds it to the tokens of that slot with the
package's carrier op. On any other vLLM version it logs one line and registers nothing: the
plugin depends on vLLM internals that change between releases.
"""

from __future__ import annotations

import logging

log = logging.getLogger("lcdd_kernels.vllm")

#: vLLM versions the plugin is written and tested against (the local part, e.g. "+cpu", ignored).
SUPPORTED_VLLM = ("0.32.0",)

_registered = False


def supported(version: str) -> bool:
    """Whether the plugin supports vLLM ``version``."""
    return version.split("+", 1)[0] in SUPPORTED_VLLM


def register() -> None:
    """vLLM's entry point (``vllm.general_plugins``: ``lcdd``). Idempotent."""
    global _registered
    if _registered:
        return
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not supported(version):
        log.warning("lcdd_kernels: vLLM %s is not supported by the carrier plugin (supported: %s); carriers "
                    "are not served natively, nothing was registered", version, ", ".join(SUPPORTED_VLLM))
        return
    from . import patches

    patches.install()
    _registered = True
