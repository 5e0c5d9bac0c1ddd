"""``lcdd export CARRIER_DIR --to peft-lora|peft-shira --out DIR``: a carrier as a PEFT adapter
(for PEFT, and for vLLM with ``--for vllm``)."""

from __future__ import annotations

from . import models_io as io
from .sign import add_verify_argument

FORMATS = {"peft-lora": "lora", "peft-shira": "shira"}


def register(sub) -> None:
    p = sub.add_parser("export", help="write a carrier as a PEFT adapter (exact LoRA or SHiRA) for PEFT and vLLM")
    p.add_argument("carrier", metavar="CARRIER_DIR", help="carrier directory (lcdd extract / Carrier.save)")
    p.add_argument("--to", required=True, choices=sorted(FORMATS), help="adapter kind")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write (new or empty)")
    p.add_argument("--max-rank", type=int, default=None, metavar="R",
                   help="LoRA: cap every module's rank at R by a truncated SVD of Δ (reports the error); "
                        "default exact")
    p.add_argument("--for", dest="target", choices=("peft", "vllm"), default="peft",
                   help="vllm: also check what vLLM can serve (rank <= 512, no dense parts) and print "
                        "the --max-lora-rank to serve with")
    p.add_argument("--adapter-dtype", choices=io.DTYPES, default=None, help="dtype of the adapter (default: the carrier's)")
    p.add_argument("--drop-dense", action="store_true",
                   help="export without the carrier's dense parts (norms, biases) where the target cannot hold them")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", choices=io.TINY_FAMILIES, help="the base model: a built-in tiny one (see --base)")
    g.add_argument("--base", metavar="DIR",
                   help="the base model (local HF directory): for the --max-rank logit probe, and to turn a "
                        "carrier's SFT biases into LoRA biases (SFT − base)")
    p.add_argument("--dtype", choices=io.DTYPES, default="float32", help="dtype to load the base model in")
    p.add_argument("--device", default=None, help="cpu or cuda for the probe (default: cuda when available)")
    p.add_argument("--allow-fingerprint-mismatch", action="store_true",
                   help="probe with a base whose weights differ from the carrier's recorded fingerprint")
    add_verify_argument(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..carriers.export import export_peft
    from ..carriers.load import load_carrier

    carrier = load_carrier(args.carrier, verify=args.verify)
    base = None
    if args.tiny or args.base:
        base, _ = io.load_base(args)
        base.eval()
    report = export_peft(carrier, args.out, kind=FORMATS[args.to], max_rank=args.max_rank,
                         dtype=getattr(torch, args.adapter_dtype) if args.adapter_dtype else None,
                         target=args.target, base_model=base, overwrite=args.overwrite, drop_dense=args.drop_dense,
                         allow_fingerprint_mismatch=args.allow_fingerprint_mismatch)
    print(report.summary())  # export_peft also logs truncation and dropped dense parts as warnings (stderr)
    if report.truncated:
        for m in sorted(report.truncated, key=lambda m: -m.rel_error)[:10]:
            print(f"    {m.path}: rank {m.kept} of {m.rank}, relative error of Δ {m.rel_error:.3g}")
        if base is None:
            print("  (pass --base DIR or --tiny FAMILY to measure the logit change on a probe batch)")
    return 0
