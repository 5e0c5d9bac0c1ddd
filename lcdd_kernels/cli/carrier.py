"""``lcdd extract`` (a carrier from trained weights and masks) and ``lcdd inspect DIR``."""

from __future__ import annotations

import json
from pathlib import Path

from . import models_io as io
from .sign import add_verify_argument


def register(sub) -> None:
    p = sub.add_parser("extract", help="write the carrier of a trained LCDD model (ours or the authors' checkpoints)")
    io.add_model_args(p, "base model (before SFT)")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the weights W: the SFT model (with --checkpoint) or the authors' saved LCDD model (with --theta)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint-<step>/ of lcdd train-lcdd (weights and masks)")
    src.add_argument("--theta", metavar="PATH",
                     help="mask logits: the authors' l0_masks.pt (or its directory), or a theta.safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="carrier directory to write")
    p.add_argument("--carrier-dtype", choices=io.DTYPES, default=None, help="dtype of Δ (default: the weights')")
    p.add_argument("--overwrite", action="store_true", help="replace a carrier already in --out")
    io.add_non_projection_arg(p)
    p.set_defaults(func=run_extract)

    p = sub.add_parser("inspect", help="per-layer, per-group sparsity and size of a carrier")
    p.add_argument("dir", metavar="DIR", help="carrier directory")
    add_verify_argument(p)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run_inspect)


def _load_checkpoint_weights(model, ck: Path) -> None:
    import torch
    from safetensors.torch import load_file

    f = Path(ck) / "trainable.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{ck} is not a train-lcdd checkpoint (no trainable.safetensors)")
    weights = load_file(str(f))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown or not any(k.endswith("lcdd_masks.theta") for k in weights):
        raise ValueError(f"{f} does not belong to this LCDD model (unexpected keys {unknown[:3]}, "
                         "or no mask logits: is it a train-sft checkpoint?)")
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != trainable:
        # the run trained norms/biases (non_projection="sft") or not ("base"): extract the same way
        extra, missing = sorted(set(weights) - trainable), sorted(trainable - set(weights))
        mode = "sft" if extra else "base"
        raise ValueError(f"{f} was trained with another --non-projection mode than this extraction (the checkpoint "
                         f"{'also holds ' + str(extra[:2]) if extra else 'lacks ' + str(missing[:2])}); "
                         f"pass --non-projection {mode}")
    with torch.no_grad():
        for k, t in weights.items():
            if tuple(t.shape) != tuple(params[k].shape):
                raise ValueError(f"{f}: {k} has shape {tuple(t.shape)}, the model's is {tuple(params[k].shape)}")
            params[k].copy_(t)


def _load_theta(handle, path: Path) -> None:
    from safetensors.torch import load_file

    from ..models.authors import load_authors_masks

    if path.is_dir() and (path / "theta.safetensors").is_file():
        path = path / "theta.safetensors"
    if path.suffix == ".safetensors":
        t = load_file(str(path))
        if "theta" not in t:
            raise ValueError(f"{path} has no 'theta' tensor (found {sorted(t)})")
        handle.set_flat_theta(t["theta"])
    else:
        load_authors_masks(handle, path)


def run_extract(args) -> int:
    import torch

    from ..carriers.extract import extract_carrier
    from ..models.patch import apply_lcdd

    base, _ = io.load_base(args)
    model = io.load_model(args.model, args)
    handle = apply_lcdd(model, base, non_projection=args.non_projection)
    if args.checkpoint:
        _load_checkpoint_weights(model, Path(args.checkpoint))
    else:
        _load_theta(handle, Path(args.theta))
    dtype = getattr(torch, args.carrier_dtype) if args.carrier_dtype else None
    carrier = extract_carrier(handle, dtype=dtype, metadata={"source": str(args.checkpoint or args.theta)})
    out = carrier.save(args.out, overwrite=args.overwrite)
    s, n = carrier.stats()["overall"], carrier.num_parameters()
    print(f"carrier written to {out}: mask sparsity {s['sparsity']:.1%}, {n['carrier']:,} delta entries "
          f"({n['ratio']:.2%} of the projection weights)")
    return 0


def _fmt(entry: dict) -> str:
    return f"{entry['active']}/{entry['total']} ({entry['sparsity']:.0%})"


def run_inspect(args) -> int:
    from ..carriers.load import load_carrier
    from ..models.families import GROUPS

    c = load_carrier(args.dir, verify=args.verify)
    stats, n = c.stats(), c.num_parameters()
    elem = c.dtype.itemsize
    nbytes = c.nbytes()
    dense = {name: {"shape": list(t.shape), "bytes": t.numel() * t.element_size()} for name, t in c.dense.items()}
    size = {"carrier_bytes": n["carrier"] * elem, "projection_bytes": n["projections"] * elem,
            "stored_bytes": nbytes, "dense_share_of_bytes": nbytes["dense"] / nbytes["total"] if nbytes["total"] else 0.0,
            **n}
    if args.json:
        print(json.dumps({"model_type": c.family, "dims": c.dims.to_dict(), "dtype": str(c.dtype).replace("torch.", ""),
                          "base_model": {"name_or_path": c.base_name, "fingerprint": c.base_fingerprint},
                          "size": size, "dense_parameters": dense, "sparsity": stats}, indent=2))
        return 0
    d = c.dims
    print(f"carrier {args.dir}")
    print(f"  model: {c.family}, {d.num_layers} layers, d={d.hidden_size}, d_ff={d.intermediate_size}, "
          f"heads {d.num_heads}/{d.num_kv_heads} (head_dim {d.head_dim}); Δ dtype {str(c.dtype).replace('torch.', '')}")
    print(f"  base: {c.base_name or '(name unknown)'}  {c.base_fingerprint[:23]}…")
    print(f"  size: {n['carrier']:,} delta entries, {size['carrier_bytes'] / 2**20:.2f} MiB = {n['ratio']:.2%} of the "
          f"projection weights ({size['projection_bytes'] / 2**20:.1f} MiB)")
    if dense:
        print(f"  dense parts: {len(dense)} parameters, {n['dense']:,} values, {nbytes['dense'] / 2**20:.3f} MiB = "
              f"{size['dense_share_of_bytes']:.1%} of the carrier's {nbytes['total'] / 2**20:.3f} MiB")
        kinds = {}
        for name, info in dense.items():
            kind = ("bias" if name.endswith(".bias") else "norm" if "norm" in name.rsplit(".", 2)[-2]
                    else name)
            k = kinds.setdefault(kind, [0, 0])
            k[0] += 1
            k[1] += info["bytes"]
        for kind, (count, b) in kinds.items():
            print(f"    {kind}: {count} tensor{'s' if count > 1 else ''}, {b / 2**10:.1f} KiB "
                  f"({b / nbytes['total']:.1%} of the bytes)")
    else:
        print("  dense parts: none (a strictly sparse carrier)")
    print(f"  masks on (active/total, sparsity = share off): overall {_fmt(stats['overall'])}\n")
    rows = [["layer"] + list(GROUPS) + ["all"]]
    for i, layer in enumerate(stats["layers"]):
        rows.append([str(i)] + [_fmt(layer["groups"][g]) for g in GROUPS] + [_fmt(layer)])
    rows.append(["total"] + [_fmt(stats["groups"][g]) for g in GROUPS] + [_fmt(stats["overall"])])
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    return 0
