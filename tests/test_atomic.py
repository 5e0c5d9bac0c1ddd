"""Nothing lost on a crash: every write of the package killed (SIGKILL) at every step leaves the
whole old or the whole new version; concurrent writers and readers; training killed at random
points and resumed ends bit-identical to an uninterrupted run. The harness is tests/helpers/fuzz_atomic.py
(``make fuzz`` runs it longer)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

import lcdd_kernels as L
from lcdd_kernels import atomic
from lcdd_kernels.carriers.layout import CONFIG_NAME, THETA_NAME, WEIGHTS_NAME

from tests.helpers.fuzz_atomic import (
    _run_state,
    _train,
    carrier_replace_case,
    kill_at_every_step,
    kill_train_and_resume,
    leftovers,
    run_child,
    same_carrier,
    snapshot,
    two_carriers,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir(),
                                reason="the fault injection forks and reads /proc (Linux)")


@pytest.fixture(scope="module")
def carriers():
    return two_carriers("qwen2")


def test_carrier_replace_killed_at_every_step(carriers, tmp_path):
    old, new = carriers
    target, prepare, save, check = carrier_replace_case(tmp_path, old, new)
    res = kill_at_every_step(target, prepare, save, check)
    names = [name for name, _, _ in res["log"]]
    # every kind of step was reached and killed at: the writes, fsyncs, the link carrying the
    # README over, the exchange, the removal of the old version
    assert {"save_file", "write_text", "fsync", "link", "renameat2", "rmtree"} <= set(names), names
    assert names.count("save_file") == 1 and names.count("write_text") == 1  # the new carrier has no θ
    assert res["points"] == len(names) + 2  # + the two torn writes
    assert res["old"] > 0 and res["new"] > 0, res
    # durability: each staged file and the staged directory are fsynced before the exchange, the
    # parent after it
    swap = names.index("renameat2")
    synced_before = {Path(p).name for name, p, _ in res["log"][:swap] if name == "fsync"}
    assert {WEIGHTS_NAME, THETA_NAME, CONFIG_NAME, "README.md"} - {THETA_NAME} <= synced_before, synced_before
    assert any(Path(p).name.startswith(".carrier.lcdd-staging.") for name, p, _ in res["log"][:swap]
               if name == "fsync")
    assert any(name == "fsync" and Path(p) == tmp_path for name, p, _ in res["log"][swap:])
    # the killed writers' staging directories are removed by the next write
    assert leftovers(tmp_path)
    new.save(target, overwrite=True)
    assert not leftovers(tmp_path)
    assert same_carrier(L.load_carrier(target), new)
    assert (target / "README.md").read_text() == "the user's notes\n"


def test_new_carrier_killed_at_every_step(carriers, tmp_path):
    _, new = carriers
    target = tmp_path / "out" / "carrier"
    res = kill_at_every_step(target, lambda: None, lambda: new.save(target),
                             lambda which: same_carrier(L.load_carrier(target), new))
    assert res["old"] > 0 and res["new"] > 0  # "old" = no directory at all


def test_refusals_are_kept(carriers, tmp_path):
    old, new = carriers
    old.save(tmp_path / "c")
    with pytest.raises(FileExistsError, match="already holds a carrier"):
        new.save(tmp_path / "c")
    assert same_carrier(L.load_carrier(tmp_path / "c"), old)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        new.save(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    new.save(tmp_path / "empty")  # an existing empty directory is filled, as before
    assert same_carrier(L.load_carrier(tmp_path / "empty"), new)
    assert not leftovers(tmp_path)


def test_symlinked_target_stays_a_link(carriers, tmp_path):
    old, new = carriers
    old.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    new.save(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink()
    assert same_carrier(L.load_carrier(tmp_path / "real"), new)


def test_export_and_trigger_killed_at_every_step(carriers, tmp_path):
    from lcdd_kernels.eraser import save_trigger
    from lcdd_kernels.eraser.eraser import EraserOptions, EraserResult
    from lcdd_kernels.models.tiny import tiny_model

    old, new = carriers
    target = tmp_path / "peft"
    res = kill_at_every_step(target, lambda: L.export_peft(old, target, drop_dense=True),
                             lambda: L.export_peft(new, target, overwrite=True, drop_dense=True))
    assert res["old"] > 0 and res["new"] > 0
    model = tiny_model("qwen2", seed=0)

    def trigger(seed):
        g = torch.Generator().manual_seed(seed)
        return EraserResult(trigger=torch.randn(3, model.config.hidden_size, generator=g), best_loss=0.5,
                            best_step=1, channels={0: torch.arange(4)}, channels_kind="write",
                            options=EraserOptions(), curves={})

    target = tmp_path / "trigger"
    res = kill_at_every_step(target, lambda: save_trigger(target, trigger(0), model),
                             lambda: save_trigger(target, trigger(1), model, overwrite=True))
    assert res["old"] > 0 and res["new"] > 0


def test_single_file_write_killed_at_every_step(tmp_path):
    """write_file_atomic (bench results, the demo's reports, the training log on resume)."""
    from lcdd_kernels.bench.common import ResultsFile

    path = tmp_path / "results.json"

    def prepare():
        ResultsFile(path, force=True).write([{"row": 0}])

    res = kill_at_every_step(path.parent, prepare, lambda: ResultsFile(path, force=True).write([{"row": 1}]))
    assert res["old"] > 0 and res["new"] > 0
    assert [n for n, _, _ in res["log"]] == ["fsync", "replace", "fsync"]


def test_concurrent_writers_one_wins_whole(carriers, tmp_path):
    old, new = carriers
    target = tmp_path / "c"
    versions = [snapshot_after_save(c, tmp_path / f"ref{i}") for i, c in enumerate(carriers)]
    for round_ in range(4):
        shutil.rmtree(target, ignore_errors=True)
        statuses = race([lambda: old.save(target, overwrite=True), lambda: new.save(target, overwrite=True)])
        assert statuses == [0, 0], statuses  # both land whole, one after the other
        assert snapshot(target) in versions, round_
        shutil.rmtree(target)
        statuses = race([lambda: old.save(target), lambda: new.save(target)])
        # overwrite=False: one wins, the other is refused (exit 3 = FileExistsError in race())
        assert sorted(statuses) == [0, 3], statuses
        assert snapshot(target) == versions[statuses.index(0)], round_
    assert not leftovers(tmp_path)


def snapshot_after_save(carrier, d):
    carrier.save(d)
    return snapshot(d)


def race(saves) -> list[int]:
    """Fork one child per save, release them together; their exit codes (3: FileExistsError)."""
    r, w = os.pipe()
    pids = []
    for save in saves:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(w)
                os.read(r, 1)  # the start signal
                save()
                code = 0
            except FileExistsError:
                code = 3
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(r)
    os.write(w, b"go")
    os.close(w)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def test_readers_see_whole_versions_while_a_writer_replaces(carriers, tmp_path):
    old, new = carriers
    target = tmp_path / "c"
    old.save(target)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for i in range(12):
                (new if i % 2 else old).save(target, overwrite=True)
                time.sleep(0.02)  # room for whole reads between the swaps, as well as reads across them
            code = 0
        finally:
            os._exit(code)
    loads = 0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        c = L.load_carrier(target)
        assert same_carrier(c, old) or same_carrier(c, new)
        loads += 1
        if done:
            break
    assert os.waitstatus_to_exitcode(status) == 0 and loads > 0


def test_without_renameat2_falls_back_with_a_warning(carriers, tmp_path, monkeypatch):
    old, new = carriers

    def unsupported(src, dst, flags):
        raise atomic.AtomicPublishError(22, "the filesystem does not support renameat2 flags", str(dst))

    monkeypatch.setattr(atomic, "_renameat2", unsupported)
    monkeypatch.setattr(atomic, "_warned", set())
    with pytest.warns(RuntimeWarning, match="not atomic"):
        old.save(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per directory
        new.save(tmp_path / "c", overwrite=True)
    assert same_carrier(L.load_carrier(tmp_path / "c"), new)
    with pytest.raises(FileExistsError, match="already holds a carrier"):
        old.save(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_write_leaves_the_target_and_no_leftover(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.publish_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("boom")
    assert snapshot(tmp_path / "d") == {"a": b"old"} and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# Training killed at random points, resumed: bit-identical to an uninterrupted run
# ---------------------------------------------------------------------------------------------

def test_training_killed_at_random_points_resumes_bit_identical(tmp_path):
    threads = torch.get_num_threads()
    try:
        seen = kill_train_and_resume(tmp_path, points=3, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 3


def test_torn_last_log_line_is_dropped_on_resume(tmp_path):
    torch_threads = torch.get_num_threads()
    _train(tmp_path / "full")
    want = _run_state(tmp_path / "full")
    out = tmp_path / "run"
    _train(out)
    shutil.rmtree(out / "checkpoint-6")
    shutil.rmtree(out / "carrier")
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 7, "epo')  # a crash in the middle of appending a row
    _train(out, resume=True)
    assert _run_state(out) == want
    assert torch.get_num_threads() == torch_threads


def test_write_file_atomic_keeps_a_link_and_the_mode(tmp_path):
    from lcdd_kernels.atomic import write_file_atomic

    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_file_atomic(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert real.stat().st_mode & 0o777 == 0o640
