"""Kill a writer at every step of a save and check what is left (used by tests/test_atomic.py;
``python -m tests.helpers.fuzz_atomic`` is the longer run of ``make fuzz``).

A save runs in a forked child whose file-system calls are intercepted: every file write
(safetensors ``save_file``, ``Path.write_text``, ``torch.save``), ``fsync``, rename (``renameat2``,
``os.replace``, ``os.rename``), hard link and ``rmtree`` is one step. A counting run lists the steps;
then for every step k the child SIGKILLs itself just before step k, and, for writes, also after
writing half of the file (a torn write). After each kill the target must hold exactly the old or the
new version, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Interception (in the forked child only: nothing is restored)
# ---------------------------------------------------------------------------------------------


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd{fd}"


def _intercept(kill_at: int | None, torn: bool, log: list) -> None:
    """Patch the calls a save makes so that the child dies at step ``kill_at``; every step is
    appended to ``log`` as (name, path, is_write)."""
    import safetensors.torch
    import torch

    from lcdd_kernels import atomic

    def step(name: str, path, torn_write: Callable[[], None] | None = None) -> None:
        k = len(log)
        log.append((name, str(path), torn_write is not None))
        if k == kill_at:
            if torn and torn_write is not None:
                torn_write()
            os.kill(os.getpid(), signal.SIGKILL)

    def truncate_half(path):
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    def wrap_file_writer(real, path_of):
        def writer(*args, **kwargs):
            path = path_of(*args, **kwargs)

            def torn_write():
                real(*args, **kwargs)
                truncate_half(path)

            step(real.__name__, path, torn_write)
            return real(*args, **kwargs)
        return writer

    def wrap(real, name, path_of):
        def call(*args, **kwargs):
            step(name, path_of(*args, **kwargs))
            return real(*args, **kwargs)
        return call

    safetensors.torch.save_file = wrap_file_writer(safetensors.torch.save_file, lambda t, f, *a, **k: f)
    torch.save = wrap_file_writer(torch.save, lambda obj, f, *a, **k: f)
    real_write_text = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        def torn_write():
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)

        step("write_text", self, torn_write)
        return real_write_text(self, data, *args, **kwargs)

    pathlib.Path.write_text = write_text
    os.fsync = wrap(os.fsync, "fsync", lambda fd: _fd_path(fd))
    os.replace = wrap(os.replace, "replace", lambda a, b, **k: b)
    os.rename = wrap(os.rename, "rename", lambda a, b, **k: b)
    os.link = wrap(os.link, "link", lambda a, b, **k: b)
    shutil.rmtree = wrap(shutil.rmtree, "rmtree", lambda p, *a, **k: p)
    atomic._renameat2 = wrap(atomic._renameat2, "renameat2", lambda a, b, flags: f"{b} flags={flags}")


def run_child(save: Callable[[], None], kill_at: int | None = None, torn: bool = False) -> tuple[int, list]:
    """Run ``save`` in a forked child (killed at step ``kill_at``); (wait status, the steps it
    logged: complete only when it was not killed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        code = 1
        try:
            os.close(r)
            log: list = []
            _intercept(kill_at, torn, log)
            save()
            os.write(w, json.dumps(log).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit code and the pipe
            try:
                os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 1 << 16):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b"[]")
    if isinstance(out, dict):
        raise AssertionError(f"the save failed in the child: {out['error']}")
    return status, out


def snapshot(d: Path) -> dict[str, bytes] | None:
    """Every file under ``d`` by relative path (None when ``d`` does not exist)."""
    from lcdd_kernels.atomic import STAGING_MARK

    if not d.exists():
        return None
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and STAGING_MARK not in str(p.relative_to(d))}


def leftovers(parent: Path) -> list[Path]:
    from lcdd_kernels.atomic import STAGING_MARK

    return [p for p in parent.iterdir() if STAGING_MARK in p.name] if parent.is_dir() else []


def kill_at_every_step(target: Path, prepare: Callable[[], None], save: Callable[[], None],
                       check: Callable[[str], None] | None = None, steps: list[int] | None = None) -> dict:
    """``prepare()`` puts the old version at ``target`` (or nothing); ``save()`` writes the new one.
    For every step (or those in ``steps``), before it and torn: prepare, kill, and assert that the
    target is byte for byte the old or the new version (``check(which)`` then, e.g. load_carrier).
    Returns counts per outcome."""
    prepare()
    old = snapshot(target)
    status, log = run_child(save)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    new = snapshot(target)
    assert new is not None and new != old
    points = [(k, False) for k in range(len(log))] + [(k, True) for k, (_, _, w) in enumerate(log) if w]
    if steps is not None:
        points = [p for p in points if p[0] in steps]
    seen = {"old": 0, "new": 0, "points": len(points), "steps": len(log)}
    for k, torn in points:
        # the same start every time: the steps of removing earlier leftovers would shift the count
        for p in leftovers(target.parent):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(target, ignore_errors=True)
        prepare()
        status, _ = run_child(save, kill_at=k, torn=torn)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, log[k], status)
        now = snapshot(target)
        where = f"killed {'in' if torn else 'before'} step {k} ({log[k][0]} {log[k][1]})"
        assert now == old or now == new, (
            f"{where}: the target is neither the old nor the new version: files "
            f"{sorted(now or {})} vs old {sorted(old or {})} / new {sorted(new)}")
        which = "old" if now == old else "new"
        seen[which] += 1
        if check is not None and now is not None:
            check(which)
    return {"log": log, **seen}


# ---------------------------------------------------------------------------------------------
# The artifacts: two versions of a carrier (the new one differs in every file, has no θ)
# ---------------------------------------------------------------------------------------------


def two_carriers(family: str = "qwen2", seed: int = 0):
    import torch

    import lcdd_kernels as L
    from lcdd_kernels.models.families import Dims

    sys.path.insert(0, str(ROOT))
    from tests.helpers.sft_pairs import sft_pair

    out = []
    for i, include_theta in ((0, True), (1, False)):
        sft, base = sft_pair(family, torch.float32, seed=12 + i + seed)
        theta = torch.randn(Dims.from_config(sft).num_masks, generator=torch.Generator().manual_seed(seed + i))
        out.append(L.extract_carrier(L.apply_lcdd(sft, base, theta=theta), include_theta=include_theta))
    return out


def same_carrier(a, b) -> bool:
    import torch

    return (a.modules.keys() == b.modules.keys() and a.dense.keys() == b.dense.keys()
            and all(torch.equal(getattr(a.modules[p], f), getattr(b.modules[p], f))
                    for p in a.modules for f in ("rows", "cols", "delta"))
            and all(torch.equal(a.dense[p], b.dense[p]) for p in a.dense)
            and ((a.theta is None) == (b.theta is None)) and (a.theta is None or torch.equal(a.theta, b.theta)))


def carrier_replace_case(root: Path, old, new, extra: bool = True):
    """(target, prepare, save, check): replace a saved carrier (with a user's README beside it)."""
    import lcdd_kernels as L

    target = root / "carrier"

    def prepare():
        old.save(target)
        if extra:
            (target / "README.md").write_text("the user's notes\n")

    def save():
        new.save(target, overwrite=True)

    def check(which):
        assert same_carrier(L.load_carrier(target), old if which == "old" else new), which

    return target, prepare, save, check


# ---------------------------------------------------------------------------------------------
# Training killed at random points and resumed
# ---------------------------------------------------------------------------------------------

CTL = dict(warmup_steps=2, lambda_init=0.5, budget_ratio=0.05, lambda_lr=0.5)


def _train(out, resume=False):
    from lcdd_kernels.dual import DualController
    from lcdd_kernels.models.tiny import tiny_model
    from lcdd_kernels.train import train_lcdd

    from tests.helpers.train_examples import random_examples

    sft, base = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=0)
    return train_lcdd(sft, base, random_examples(n=8, seed=3), out_dir=out, controller=DualController(**CTL),
                      max_steps=6, save_every=2, lr=5e-3, batch_size=2, grad_accum=1, progress=False, plot=False,
                      seed=4, resume=resume)


def _run_state(out: Path) -> tuple[dict, list[dict]]:
    from lcdd_kernels.carriers.layout import CONFIG_NAME, THETA_NAME, WEIGHTS_NAME

    files = {n: (out / "carrier" / n).read_bytes() for n in (WEIGHTS_NAME, THETA_NAME, CONFIG_NAME)}
    log = [{k: v for k, v in json.loads(line).items() if k != "time"}  # wall time differs, nothing else
           for line in (out / "log.jsonl").read_text().splitlines()]
    return files, log


def kill_train_and_resume(root: Path, points: int, seed: int) -> list[str]:
    """One uninterrupted run, then ``points`` runs killed at random steps (of the fault harness:
    checkpoint and carrier writes included) and resumed; each must end bit-identical."""
    import torch

    from lcdd_kernels.train.loop import latest_checkpoint

    torch.set_num_threads(1)  # the forked children run the same ops: no OpenMP pool across fork
    _train(root / "full")
    want = _run_state(root / "full")
    status, log = run_child(lambda: _train(root / "count"))
    assert status == 0
    rng = random.Random(seed)
    seen = []
    for k in sorted(rng.sample(range(len(log)), points)):
        out = root / f"killed-{k}"
        status, _ = run_child(lambda: _train(out), kill_at=k, torn=rng.random() < 0.5)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if latest_checkpoint(out) is None:  # killed before the first checkpoint: start again
            shutil.rmtree(out)
            _train(out)
        else:
            _train(out, resume=True)
        got = _run_state(out)
        assert got[1] == want[1], f"killed at step {k} ({log[k][0]} {log[k][1]}): the log differs"
        assert got[0] == want[0], f"killed at step {k} ({log[k][0]} {log[k][1]}): the carrier differs"
        seen.append(f"{log[k][0]} {Path(log[k][1]).name}")
    return seen


def fuzz(rounds: int, seed: int = 0) -> dict:
    """Random families, random kill points (before or torn), replacing and creating carriers."""
    import lcdd_kernels as L
    from lcdd_kernels.models.tiny import TINY

    rng = random.Random(seed)
    totals = {"cases": 0, "old": 0, "new": 0}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            family = rng.choice(sorted(TINY))
            old, new = two_carriers(family, seed=r)
            root = Path(tmp) / f"r{r}"
            if rng.random() < 0.5:
                target, prepare, save, check = carrier_replace_case(root, old, new, extra=rng.random() < 0.5)
            else:
                target = root / "fresh"

                def prepare(target=target):
                    shutil.rmtree(target, ignore_errors=True)

                def save(target=target, new=new):
                    new.save(target)

                def check(which, target=target, new=new):
                    assert same_carrier(L.load_carrier(target), new)
            res = kill_at_every_step(target, prepare, save, check)
            totals["cases"] += res["points"]
            totals["old"] += res["old"]
            totals["new"] += res["new"]
            new.save(target, overwrite=True)  # the next write cleans what the killed ones left
            stale = leftovers(root)
            assert not stale, f"leftovers after a clean write: {stale}"
            shutil.rmtree(root)
    totals["seconds"] = round(time.perf_counter() - t0, 1)
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="carrier pairs, each killed at every step")
    p.add_argument("--train-points", type=int, default=12,
                   help="training runs killed at random steps and resumed (bit-identical to an uninterrupted run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    totals = fuzz(args.rounds, args.seed)
    print(f"atomic-write fuzz: {totals['cases']} kills over {args.rounds} saves; target was the old version "
          f"{totals['old']} times, the new {totals['new']} times, never anything else ({totals['seconds']} s)")
    if args.train_points:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            seen = kill_train_and_resume(Path(tmp), args.train_points, args.seed)
        print(f"training killed at {len(seen)} random steps and resumed: carrier and log bit-identical to an "
              f"uninterrupted run every time ({time.perf_counter() - t0:.1f} s); killed at: {'; '.join(seen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
