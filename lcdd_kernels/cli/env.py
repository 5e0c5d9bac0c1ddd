"""``lcdd env``: versions, devices and which backends can run, for bug reports."""

from __future__ import annotations

import json
import platform


def report() -> dict:
    import torch

    import lcdd_kernels
    from lcdd_kernels import _backend

    info = {
        "lcdd_kernels": lcdd_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": None,
        "transformers": None,
        "native_extension": _backend.native_available(),
        "native_cuda": _backend.native_has_cuda(),
        "triton_interpret": _backend.triton_interpret(),
        "LCDD_BACKEND": _backend.requested(),
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # report, never fail
            info[mod] = f"unavailable ({type(e).__name__})"
    return info


def run(args) -> int:
    info = report()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("env", help="print versions, devices and available backends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
