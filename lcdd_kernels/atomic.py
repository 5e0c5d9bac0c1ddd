"""Atomic, durable publication of the directories and files the package writes.

:func:`publish_dir` stages a directory next to its target (same filesystem), lets the caller write
into it, fsyncs every file and directory of it, then publishes it with one ``renameat2`` call:
``RENAME_EXCHANGE`` swaps it with an existing target (the old version, now under the staging name,
is removed afterwards), ``RENAME_NOREPLACE`` creates a new target so that two writers racing for
one path cannot both land; the parent directory is fsynced after. At every instant the target path
holds the complete old version or the complete new one. :func:`write_file_atomic` does the same for
one file (write + fsync a sibling, ``os.replace``, fsync the directory).

Leftovers of an interrupted write are hidden siblings named ``.<target>.lcdd-staging.<host>.<pid>.<tag>``;
readers never look at them, and the next write to the same target removes those whose process is
gone (on the same host).

Where ``renameat2`` is missing (not Linux, glibc < 2.28) or the filesystem refuses its flags (some
network and FUSE filesystems), publication falls back to plain renames with a warning: a new target
is created with ``rename`` after an existence check, an existing one is replaced in two renames,
between which the target is briefly absent (the old version is kept as ``.<target>.lcdd-old.…``
until the new one is in place).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = ["publish_dir", "write_file_atomic", "fsync_tree", "AtomicPublishError", "STAGING_MARK"]

#: What every staging name contains after ``.<target>``: readers and listings can skip such entries.
STAGING_MARK = ".lcdd-staging."
_OLD_MARK = ".lcdd-old."
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_NAME_KEEP = 100  # characters of the target name kept in sibling names (NAME_MAX is 255 bytes)


class AtomicPublishError(OSError):
    """The filesystem cannot publish atomically (``renameat2`` unsupported there)."""


# ---------------------------------------------------------------------------------------------
# renameat2
# ---------------------------------------------------------------------------------------------

_libc_fn = None


def _renameat2_fn():
    global _libc_fn
    if _libc_fn is None:
        fn = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = False
        _libc_fn = fn
    return _libc_fn or None


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """``renameat2(src, dst, flags)``; AtomicPublishError where it is unavailable or unsupported."""
    fn = _renameat2_fn()
    if fn is None:
        raise AtomicPublishError(errno.ENOSYS, "renameat2 is not available on this system", str(dst))
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        if e in _UNSUPPORTED:
            raise AtomicPublishError(e, f"the filesystem does not support renameat2 flags {flags} "
                                        f"({os.strerror(e)})", str(dst))
        raise OSError(e, os.strerror(e), str(src), None, str(dst))


# ---------------------------------------------------------------------------------------------
# fsync
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every regular file and directory under ``root`` (``root`` included), deepest first,
    so that a directory entry is durable only after what it names."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath), directory=True)


# ---------------------------------------------------------------------------------------------
# Sibling names and the leftovers of interrupted writes
# ---------------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _sibling(target: Path, mark: str) -> Path:
    return target.parent / f".{target.name[:_NAME_KEEP]}{mark}{_host()}.{os.getpid()}.{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove the staging leftovers of ``target`` whose writer (on this host) is gone; returns them.
    Those of live writers and of other hosts are left alone."""
    target = Path(target)
    prefix = f".{target.name[:_NAME_KEEP]}{STAGING_MARK}{_host()}."
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


# ---------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_fallback(target: Path, err: OSError) -> None:
    key = str(target.parent)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{target.parent}: {err.strerror}; writing {target.name} with plain renames, which is "
                      "not atomic (a crash while replacing can leave the old version only under a "
                      f".{target.name}{_OLD_MARK}… name). Write to a local Linux filesystem for atomic saves.",
                      RuntimeWarning, stacklevel=4)


def _carry_over(old: Path, staged: Path, owned: Iterable[str]) -> None:
    """Hard-link (copy where links fail) the entries of ``old`` that the new version does not own."""
    owned = set(owned)

    def link(src, dst):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    for entry in os.scandir(old):
        if entry.name in owned or STAGING_MARK in entry.name or (staged / entry.name).exists():
            continue
        dst = staged / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        else:
            link(entry.path, dst)


def _publish(staged: Path, target: Path, conflict: Callable[[Path], str | None] | None) -> None:
    """Move the complete, fsynced ``staged`` to ``target``. Raises FileExistsError (and publishes
    nothing) when ``conflict(existing_target)`` names a reason not to replace it."""
    def refuse_if_conflict(existing: Path) -> None:
        reason = conflict(existing) if conflict is not None else None
        if reason:
            raise FileExistsError(reason)

    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(errno.EEXIST, f"{target} exists and is not a directory", str(target))
        refuse_if_conflict(target)
        exchange = True
    else:
        try:
            _renameat2(staged, target, _RENAME_NOREPLACE)
            exchange = False
        except FileExistsError:
            # another writer created the target meanwhile: it is whole (it was published the same
            # way); replace it only where this writer may replace what is there
            if not target.is_dir():
                raise FileExistsError(errno.EEXIST, f"{target} exists and is not a directory", str(target))
            refuse_if_conflict(target)
            exchange = True
    if exchange:
        _renameat2(staged, target, _RENAME_EXCHANGE)
        # `staged` now names the version that was there; if a writer published one there between
        # the check above and the exchange that this writer may not replace, swap it back.
        try:
            refuse_if_conflict(staged)
        except FileExistsError:
            _renameat2(staged, target, _RENAME_EXCHANGE)
            raise
    _fsync_path(target.parent, directory=True)
    if exchange:
        shutil.rmtree(staged, ignore_errors=True)
        _fsync_path(target.parent, directory=True)


def _publish_fallback(staged: Path, target: Path, conflict) -> None:
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(errno.EEXIST, f"{target} exists and is not a directory", str(target))
        reason = conflict(target) if conflict is not None else None
        if reason:
            raise FileExistsError(reason)
        old = _sibling(target, _OLD_MARK)
        os.rename(target, old)
        os.rename(staged, target)
        _fsync_path(target.parent, directory=True)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, target)
    _fsync_path(target.parent, directory=True)


def overwrite_guard(target: str | os.PathLike, names: Iterable[str], what: str,
                    overwrite: bool) -> Callable[[Path], str | None]:
    """The refusal of a writer that must not replace an artifact unless told to: raises
    FileExistsError now when ``target`` is a file or already holds one of ``names`` (and not
    ``overwrite``), and returns the same check for :func:`publish_dir`'s ``conflict`` (run again at
    publishing, against a writer that got there first)."""
    d, names = Path(target), tuple(names)
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} exists and is not a directory")

    def conflict(existing: Path) -> str | None:
        found = [n for n in names if (existing / n).exists()]
        if found and not overwrite:
            return (f"{d} already holds a {what} ({', '.join(found)}); choose another "
                    "directory or pass overwrite=True (CLI: --overwrite)")
        return None

    reason = conflict(d) if d.is_dir() else None
    if reason:
        raise FileExistsError(reason)
    return conflict


@contextmanager
def publish_dir(target: str | os.PathLike, *, conflict: Callable[[Path], str | None] | None = None,
                owned: Iterable[str] | None = None) -> Iterator[Path]:
    """Write a directory atomically and durably: ``with publish_dir(path) as tmp: <write into tmp>``.

    ``tmp`` is an empty directory next to ``path``; when the block ends without an exception, every
    file and directory in it is fsynced and it replaces ``path`` in one step (``renameat2``), then
    the parent directory is fsynced. If the block raises, ``tmp`` is removed and ``path`` is left
    as it was. A process killed at any point leaves ``path`` holding the whole old or the whole new
    version, never a mix and never nothing (see the module docstring for filesystems without
    ``renameat2``).

    Args:
        target: the directory to write; its parent is created if needed. A symlink to a directory
            is followed (the directory it points to is replaced, the link stays).
        conflict: called with an existing directory at ``target`` (before publishing, and again on
            the replaced version after the swap, which closes the race with another writer); a
            non-empty string refuses the replacement with FileExistsError carrying that message
            (the existing version stays, and a swapped one is swapped back). ``None``: replace freely.
        owned: names of the entries this writer defines. When given, the other entries of an
            existing ``target`` (a user's README, sub-directories) are carried into the new version
            (hard links, so no data is copied); when ``None`` the new version replaces the whole
            directory.
    """
    target = Path(target)
    if target.is_symlink() and target.is_dir():
        target = target.resolve()
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise FileExistsError(errno.EEXIST, f"{target} exists and is not a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    staged = _sibling(target, STAGING_MARK)
    staged.mkdir()
    try:
        yield staged
        if owned is not None and target.is_dir():
            _carry_over(target, staged, owned)
        fsync_tree(staged)
        try:
            _publish(staged, target, conflict)
        except AtomicPublishError as e:
            _warn_fallback(target, e)
            _publish_fallback(staged, target, conflict)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def write_file_atomic(path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8") -> Path:
    """Replace the file ``path`` with ``data`` atomically and durably: a sibling is written and
    fsynced, renamed over ``path`` (``os.replace``), and the directory is fsynced. A reader sees the
    old content or the new, never a torn file. A symlink is followed (the link stays, its target
    is replaced, as :func:`publish_dir` does) and the old file's permission bits are kept.
    Returns ``path``."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = _sibling(path, STAGING_MARK)
    raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
    try:
        with open(tmp, "xb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_path(path.parent, directory=True)
    return path
