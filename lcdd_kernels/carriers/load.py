"""Loading a carrier directory: :func:`load_carrier` checks its signature first when asked
(:mod:`.signing`), then reads and validates every file (:mod:`.files`)."""

from __future__ import annotations

import os

import torch

from .carrier import Carrier
from .files import read_carrier
from .signing import verify_carrier


def load_carrier(directory: str | os.PathLike, device: torch.device | str = "cpu",
                 verify: str | os.PathLike | None = None) -> Carrier:
    """Read and validate a carrier directory written by :meth:`Carrier.save` (format 1 or 2).

    Every config field, tensor key, dtype, shape, index and (format 2) content hash is checked,
    cheap consistency checks first; the config's counts must agree with the tensors. A damaged or
    mismatched file raises a ValueError naming the file and the tensor or field.

    ``verify``: a PEM public key; the carrier must then carry a signature by its private key over
    exactly these files (:func:`~lcdd_kernels.carriers.signing.verify_carrier`), or a
    :class:`~lcdd_kernels.carriers.signing.CarrierSignatureError` says why not (unsigned, another
    key, changed content). Without it, signatures are not looked at.
    """
    check = None if verify is None else (lambda d: verify_carrier(d, verify))
    return read_carrier(directory, device, check)
