"""Signed carriers: who made this carrier, checked offline with an elliptic-curve key pair.

:func:`sign_carrier` signs every file of a carrier directory with the OpenSSF ``model-signing``
library (a Sigstore bundle with a DSSE envelope over the SHA-256 of each file, key based, no
network) and writes the signature into the directory as ``carrier.sig`` (left out of what is
signed). :func:`verify_carrier` checks it against a public key and raises
:class:`CarrierSignatureError` naming the reason: no signature, another key, a damaged signature,
or content that differs from what was signed (a file changed, added or removed). ``load_carrier(dir,
verify="PUBLIC.pem")`` runs it before loading.

A valid signature proves that the holder of the private key signed exactly these bytes; it does
not prove that the carrier is safe, nor that it was trained on what its metadata says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .layout import CONFIG_NAME, SIGNATURE_NAME

__all__ = ["SIGNATURE_NAME", "CarrierSignatureError", "sign_carrier", "verify_carrier"]

_INSTALL = "pip install 'lcdd-kernels[sign]' (or: pip install model-signing pyopenssl)"


class CarrierSignatureError(ValueError):
    """A carrier's signature is missing, made with another key, damaged, or over other content."""


def _model_signing():
    try:
        import model_signing
    except ImportError as e:
        raise ImportError(f"signing and verifying carriers needs the model-signing library ({e}); {_INSTALL}") \
            from None
    return model_signing


def _key_file(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist (a PEM file; e.g. `openssl ecparam -name prime256v1 "
                                "-genkey -noout -out private.pem` and `openssl ec -in private.pem -pubout -out "
                                "public.pem`)")
    return p


def _carrier_dir(directory) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"carrier directory {d} does not exist")
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG_NAME}; is it a carrier directory (Carrier.save / lcdd extract)?")
    # model-signing refuses a symlinked model path; the manifest names files relative to it
    return d.resolve()


def _diff_summary(msg: str) -> str:
    """model-signing's manifest diff (the repr of a list of sentences with raw digests) as file
    names only."""
    q = r"\\?['\"]"  # a quote, escaped or not, as repr() writes it
    parts = []
    changed = re.findall(rf"Hash mismatch for {q}(.+?){q}: Expected", msg)
    if changed:
        parts.append("changed: " + ", ".join(changed))
    for label, head in (("added", "Extra files found in model"), ("removed", "Missing files in model")):
        m = re.search(rf"{head} {q}.*?{q}: (.+?)[\"'](?:, [\"']|\]$)", msg)
        if m:
            parts.append(f"{label}: {m.group(1).strip()}")
    return "; ".join(parts) or msg


def _hashing_config(ms):
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])


def sign_carrier(directory: str | os.PathLike, key: str | os.PathLike, password: str | None = None) -> Path:
    """Sign the carrier in ``directory`` with the elliptic-curve private key in the PEM file ``key``
    (P-256, P-384 or P-521; ``password`` if the key is encrypted). The carrier is loaded and validated
    first (a damaged carrier is not signed). Writes ``directory/carrier.sig`` atomically (replacing
    an older signature) and returns its path. Offline: no certificate, no transparency log."""
    from ..atomic import STAGING_MARK, _fsync_path, _sibling, clean_leftovers
    from .files import read_carrier

    ms = _model_signing()
    d = _carrier_dir(directory)
    key = _key_file(key, "private key")
    read_carrier(d)
    # staged next to the directory, not in it: a leftover inside would count as an unsigned file
    clean_leftovers(d.parent / f"{d.name}.sig")  # a signer killed before its rename left one
    tmp = _sibling(d.parent / f"{d.name}.sig", STAGING_MARK)
    try:
        try:
            signer = ms.signing.Config().set_hashing_config(_hashing_config(ms)).use_elliptic_key_signer(
                private_key=key, password=password)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{key} is not a usable elliptic-curve private key in PEM ({e})") from None
        signer.sign(d, tmp)
        _fsync_path(tmp)
        os.replace(tmp, d / SIGNATURE_NAME)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_path(d, directory=True)
    return d / SIGNATURE_NAME


def verify_carrier(directory: str | os.PathLike, public_key: str | os.PathLike) -> None:
    """Check ``directory/carrier.sig`` against the PEM public key ``public_key`` and every file of
    the directory against what was signed. Raises :class:`CarrierSignatureError` naming the reason
    (no signature, another key, a damaged signature, changed / added / removed files); returns None
    when the carrier is exactly what the key's holder signed."""
    ms = _model_signing()
    d = _carrier_dir(directory)
    public_key = _key_file(public_key, "public key")
    sig = d / SIGNATURE_NAME
    if not sig.is_file():
        raise CarrierSignatureError(f"{directory} is not signed (no {SIGNATURE_NAME}); the carrier's maker signs it "
                                    "with `lcdd sign DIR --key PRIVATE.pem` (lk.sign_carrier), or load it "
                                    "without verify to accept an unsigned carrier")
    try:
        verifier = ms.verifying.Config().set_hashing_config(_hashing_config(ms)).use_elliptic_key_verifier(
            public_key=public_key)
    except ValueError as e:
        raise ValueError(f"{public_key} is not an elliptic-curve public key in PEM ({e}); pass the PUBLIC key "
                         "(`openssl ec -in private.pem -pubout`)") from None
    try:
        verifier.verify(d, sig)
    except Exception as e:  # model-signing raises ValueError and parsing errors of several kinds
        msg = str(e)
        if msg.startswith("Key mismatch"):
            reason = f"it was signed with another key than {public_key}"
        elif msg.startswith("Signature mismatch"):
            reason = f"its content differs from what was signed ({_diff_summary(msg)}): it was changed after signing"
        else:
            reason = f"its signature {SIGNATURE_NAME} is invalid or damaged ({type(e).__name__}: {msg})"
        raise CarrierSignatureError(f"{directory}: refusing the carrier: {reason}") from None
