"""Corruption fuzzer for carrier directories: every damaged directory must end in a
correct load or a refusal that names the file, within bounded time and memory.

Cases are made from valid carriers (format 2 with dense parts and θ, format 2 float16 sparse-only,
the format-1 fixture) by 1-3 random mutations: truncation, bit flips in the safetensors header and
in the data, overwritten byte spans, edited JSON (values replaced by huge / negative / wrong-typed /
deeply nested ones, keys dropped or added, raw text damage), tensor keys renamed, tensors cast to
another dtype, huge shapes and offsets in the header, and pickles in place of the tensor files (one
that would create a marker file if it were ever unpickled).

They are loaded by a worker subprocess under an address-space limit (``RLIMIT_AS``); each case has
a time limit; a worker that dies, runs out of memory or time is a failure of that case and is
restarted for the rest. Outcomes:

- ``refused``: ValueError / FileNotFoundError whose message names a file of the directory;
- ``loaded-equal``: loaded, every tensor equal to the original carrier's;
- ``loaded-config-only``: loaded, tensors equal, an unhashed config field differs (metadata, base
  name or fingerprint -- a changed fingerprint is refused when the carrier is applied);
- ``loaded-different-v1``: a damaged format-1 file that loaded with other tensors: format 1 has
  no hashes (its load warns so); counted, not a failure;
- failures: ``loaded-different`` (a silent wrong answer), ``unnamed-error`` (another exception, or
  one that does not name the file), ``crash`` (signal, MemoryError, time limit), ``pickle-executed``.

Run: ``python -m tests.helpers.fuzz_carrier_files --cases 2000`` (``make fuzz``); tests/carriers/test_fuzz_carrier_files.py
runs a bounded number in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAILURES = ("loaded-different", "unnamed-error", "crash", "pickle-executed")
FILES = ("carrier_config.json", "carrier.safetensors", "theta.safetensors")


# ---------------------------------------------------------------------------------------------
# Valid carriers to start from
# ---------------------------------------------------------------------------------------------


def make_originals(root: Path) -> list[Path]:
    import torch

    import lcdd_kernels as L
    from lcdd_kernels.models.families import Dims

    sys.path.insert(0, str(ROOT))
    from tests.helpers.sft_pairs import sft_pair

    out = []
    for name, family, dtype, mode in (("qwen2-dense", "qwen2", torch.float32, "sft"),
                                      ("llama-fp16", "llama", torch.float16, "base")):
        sft, base = sft_pair(family, dtype)
        theta = torch.randn(Dims.from_config(sft).num_masks, generator=torch.Generator().manual_seed(1))
        L.extract_carrier(L.apply_lcdd(sft, base, theta=theta, non_projection=mode)).save(root / name)
        out.append(root / name)
    shutil.copytree(ROOT / "tests" / "carriers" / "data" / "carrier_v1", root / "v1")
    out.append(root / "v1")
    return out


# ---------------------------------------------------------------------------------------------
# Mutations (each takes the case directory and a random generator)
# ---------------------------------------------------------------------------------------------


def _files(d: Path) -> list[Path]:
    return [d / f for f in FILES if (d / f).is_file()]


def _header_len(raw: bytes) -> int:
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else 0
    return n if 8 + n <= len(raw) else max(len(raw) - 8, 0)


def m_truncate(d, r):
    f = r.choice(_files(d))
    raw = f.read_bytes()
    f.write_bytes(raw[:r.randrange(len(raw) + 1)] if raw else raw)


def m_flip_header(d, r):
    f = r.choice([p for p in _files(d) if p.suffix == ".safetensors"] or _files(d))
    raw = bytearray(f.read_bytes())
    if not raw:
        return
    end = min(len(raw), 8 + _header_len(raw))
    for _ in range(r.choice((1, 1, 2, 8))):
        i = r.randrange(end)
        raw[i] ^= 1 << r.randrange(8)
    f.write_bytes(bytes(raw))


def m_flip_data(d, r):
    f = r.choice([p for p in _files(d) if p.suffix == ".safetensors"] or _files(d))
    raw = bytearray(f.read_bytes())
    start = 8 + _header_len(raw)
    if start >= len(raw):
        return
    for _ in range(r.choice((1, 1, 1, 3))):
        i = r.randrange(start, len(raw))
        raw[i] ^= 1 << r.randrange(8)
    f.write_bytes(bytes(raw))


def m_overwrite(d, r):
    f = r.choice(_files(d))
    raw = bytearray(f.read_bytes())
    if not raw:
        return
    i = r.randrange(len(raw))
    n = r.choice((4, 16, 100))
    raw[i:i + n] = bytes(r.randrange(256) for _ in range(min(n, len(raw) - i)))
    f.write_bytes(bytes(raw))


_VALUES = [None, True, -1, 0, 10**12, 10**400, "9" * 100, 1e308, -0.5, 0.5, "x", [], {}, [1, 2],
           {"a": 1}, "sha256:" + "0" * 64, "float32", "int8", "llama", 2]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def m_edit_json(d, r):
    f = d / FILES[0]
    try:
        cfg = json.loads(f.read_text())
    except Exception:
        return m_text_json(d, r)
    paths = [p for p in _paths(cfg) if p]
    if not paths:
        return
    path = r.choice(paths)
    parent = cfg
    for k in path[:-1]:
        parent = parent[k]
    op = r.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.25 and isinstance(parent, dict):
        parent["extra_" + str(r.randrange(100))] = r.choice(_VALUES)
    elif op < 0.35:
        v = parent[path[-1]]
        parent[path[-1]] = (v + r.choice((1, -1, 10**9))) if isinstance(v, int) and not isinstance(v, bool) else v
    else:
        parent[path[-1]] = r.choice(_VALUES)
    text = json.dumps(cfg)
    if r.random() < 0.05:
        text = text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    f.write_text(text)


def m_text_json(d, r):
    f = d / FILES[0]
    t = f.read_text(errors="replace")
    if not t:
        return
    i = r.randrange(len(t))
    junk = r.choice(['"', "{", "}", "]", ",", "\\", "\x00", "NaN", "Infinity", "\u00e9", "9" * 5000])
    f.write_text(t[:i] + junk + t[i + r.randrange(3):])


def _rewrite_tensors(d, r, fn):
    from safetensors.torch import load_file, save_file

    f = d / r.choice([FILES[1], FILES[2]] if (d / FILES[2]).is_file() else [FILES[1]])
    try:
        t = load_file(str(f))
    except Exception:
        return
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(f))


def m_rename_key(d, r):
    def fn(t):
        k = r.choice(sorted(t))
        new = r.choice([k + "x", k.replace("layers.0", "layers.7"), k.replace("carrier_", ""), "theta", k.upper()])
        t[new] = t.pop(k)
    _rewrite_tensors(d, r, fn)


def m_dtype(d, r):
    import torch

    def fn(t):
        k = r.choice(sorted(t))
        t[k] = t[k].to(r.choice([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
                                 torch.int32, torch.uint8, torch.bool]))
    _rewrite_tensors(d, r, fn)


def m_huge_header(d, r):
    f = d / FILES[1]
    raw = f.read_bytes()
    n = _header_len(raw)
    try:
        header = json.loads(raw[8:8 + n])
    except Exception:
        return
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return
    k = r.choice(keys)
    what = r.random()
    if what < 0.4:
        header[k]["shape"] = [r.choice((10**9, 2**31, 2**62, 10**15))] * len(header[k]["shape"] or [1])
    elif what < 0.7:
        header[k]["data_offsets"] = [0, r.choice((2**40, 2**63, 10**30))]
    else:
        raw = (r.choice((2**40, 2**63, 10**8)).to_bytes(8, "little")) + raw[8:]
        f.write_bytes(raw)
        return
    body = json.dumps(header).encode()
    f.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])


class _Marker:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def m_pickle(d, r):
    import torch

    f = d / r.choice(FILES)
    if r.random() < 0.5:
        f.write_bytes(pickle.dumps(_Marker(str(d / "PICKLE_EXECUTED"))))
    else:
        torch.save({"theta": torch.ones(3)}, f)


MUTATIONS = {"truncate": m_truncate, "flip-header": m_flip_header, "flip-data": m_flip_data,
             "overwrite": m_overwrite, "edit-json": m_edit_json, "text-json": m_text_json,
             "rename-key": m_rename_key, "dtype": m_dtype, "huge-header": m_huge_header, "pickle": m_pickle}


def make_cases(root: Path, originals: list[Path], n: int, seed: int) -> list[dict]:
    r = random.Random(seed)
    cases = []
    names = sorted(MUTATIONS)
    for i in range(n):
        src = originals[i % len(originals)]
        d = root / f"case{i:05d}"
        shutil.copytree(src, d)
        applied = [names[i % len(names)]] + [r.choice(names) for _ in range(r.choice((0, 0, 1, 2)))]
        for m in applied:
            MUTATIONS[m](d, r)
        cases.append({"dir": str(d), "original": str(src), "mutations": applied})
    return cases


# ---------------------------------------------------------------------------------------------
# The worker (subprocess) and the driver
# ---------------------------------------------------------------------------------------------


def _same(a, b) -> tuple[bool, bool]:
    """(tensors equal, unhashed config fields equal) of two loaded carriers."""
    import torch

    ta, tb = a.tensors(), b.tensors()
    same = (ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
            and a.family == b.family and a.dims == b.dims and a.dtype == b.dtype
            and (a.theta is None) == (b.theta is None) and (a.theta is None or torch.equal(a.theta, b.theta)))
    config = a.base_fingerprint == b.base_fingerprint and a.base_name == b.base_name and a.metadata == b.metadata
    return same, config


def worker(limit_bytes: int, cases_file: str) -> None:
    import logging

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    logging.disable(logging.WARNING)
    import lcdd_kernels as L

    originals = {}
    for case in json.loads(Path(cases_file).read_text()):
        d = case["dir"]
        if case["original"] not in originals:
            originals[case["original"]] = L.load_carrier(case["original"])
        print(json.dumps({"start": d}), flush=True)
        t0 = time.perf_counter()
        try:
            c = L.load_carrier(d)
        except (ValueError, FileNotFoundError) as e:
            msg = str(e)
            named = any(os.path.join(d, f) in msg for f in FILES) or d in msg
            out = {"outcome": "refused" if named else "unnamed-error", "error": f"{type(e).__name__}: {msg[:300]}"}
        except MemoryError:
            out = {"outcome": "crash", "error": "MemoryError"}
        except BaseException as e:  # noqa: BLE001 - everything else is an unhelpful refusal
            out = {"outcome": "unnamed-error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        else:
            same, config = _same(c, originals[case["original"]])
            v1 = json.loads(Path(case["original"], FILES[0]).read_text())["format_version"] == 1
            out = {"outcome": ("loaded-equal" if config else "loaded-config-only") if same
                   else "loaded-different-v1" if v1 else "loaded-different"}
        if os.path.exists(os.path.join(d, "PICKLE_EXECUTED")):
            out = {"outcome": "pickle-executed"}
        out["seconds"] = time.perf_counter() - t0
        print(json.dumps({"done": d, **out}), flush=True)


def run(cases: list[dict], limit_gib: float = 2.0, timeout_s: float = 30.0) -> list[dict]:
    results = {}
    pending = list(cases)
    cases_file = Path(cases[0]["dir"]).parent / "pending.json" if cases else None
    while pending:
        cases_file.write_text(json.dumps(pending))  # a file, not a pipe: both pipes full would deadlock
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.fuzz_carrier_files", "--worker",
                                 "--limit-gib", str(limit_gib), "--cases-file", str(cases_file)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, cwd=str(ROOT), env=env)
        current, deadline = None, time.monotonic() + 120.0  # the worker's start (imports)
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:  # the case (or the start) ran past its time limit
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if "start" in msg:
                current, deadline = msg["start"], time.monotonic() + timeout_s
            else:
                results[msg["done"]] = msg
                current = None
        proc.wait()
        if current is not None:  # died or stalled inside a case
            results[current] = {"outcome": "crash", "error": f"worker exit {proc.returncode} (signal, out of "
                                                              f"memory or over {timeout_s:.0f} s)"}
        elif len(results) < len(cases) and not any(c["dir"] in results for c in pending):
            raise RuntimeError("the fuzz worker failed before its first case (see python -m tests.helpers.fuzz_carrier_files)")
        pending = [c for c in pending if c["dir"] not in results]
    return [{**c, **results[c["dir"]]} for c in cases]


def summarise(results: list[dict]) -> dict:
    counts = Counter(r["outcome"] for r in results)
    by_mut = {}
    for r in results:
        by_mut.setdefault(r["mutations"][0], Counter())[r["outcome"]] += 1
    return {"cases": len(results), "outcomes": dict(sorted(counts.items())),
            "failures": sum(counts[f] for f in FAILURES),
            "max_seconds": max((r.get("seconds", 0.0) for r in results), default=0.0),
            "by_first_mutation": {k: dict(v) for k, v in sorted(by_mut.items())}}


def fuzz(n: int, seed: int = 0, limit_gib: float = 2.0, timeout_s: float = 30.0, keep: Path | None = None):
    root = Path(tempfile.mkdtemp(prefix="lcdd-fuzz-")) if keep is None else keep
    try:
        originals = make_originals(root / "originals")
        cases = make_cases(root, originals, n, seed)
        results = run(cases, limit_gib, timeout_s)
        return summarise(results), results
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-gib", type=float, default=2.0, help="address-space limit of the loading process")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    p.add_argument("--keep", metavar="DIR", help="keep the case directories here (for a failing case)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(int(args.limit_gib * 2**30), args.cases_file)
        return 0
    t0 = time.perf_counter()
    summary, results = fuzz(args.cases, args.seed, args.limit_gib, args.timeout,
                            Path(args.keep) if args.keep else None)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2))
    for r in results:
        if r["outcome"] in FAILURES:
            print(f"FAILED {r['outcome']}: {r['dir']} {r['mutations']} {r.get('error', '')}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
