"""``lcdd train-sft`` (phase 1) and ``lcdd train-lcdd`` (phase 2, writes the carrier)."""

from __future__ import annotations

import copy

from . import models_io as io


def register(sub) -> None:
    p = sub.add_parser("train-sft", help="phase 1: SFT of a base model's projections, or all of it (writes OUT/model)")
    io.add_model_args(p, "base model to fine-tune")
    io.add_train_args(p, epochs=3.0, lr=2e-5)
    p.add_argument("--train-all", action="store_true",
                   help="train every parameter (default: the projection weights only; train-lcdd keeps "
                        "changed norms/biases with --non-projection sft, resets them with base)")
    p.set_defaults(func=run_sft)

    p = sub.add_parser("train-lcdd", help="phase 2: LCDD masks + weights under the loss budget (writes OUT/carrier)")
    io.add_model_args(p, "base model (before SFT)")
    p.add_argument("--sft", required=True, metavar="DIR",
                   help="the fully fine-tuned model (e.g. OUT/model of lcdd train-sft)")
    io.add_train_args(p, epochs=1.0, lr=2e-5)
    p.add_argument("--mask-lr", type=float, default=0.1, help="SGD learning rate of the mask logits")
    p.add_argument("--warmup", type=int, default=300, help="penalty warmup steps; ε is fixed at its end")
    p.add_argument("--budget-ratio", type=float, default=0.3, help="ε = baseline · (1 + ratio)")
    p.add_argument("--lambda-init", type=float, default=0.01)
    p.add_argument("--lambda-lr", type=float, default=0.1, help="η of the dual update")
    io.add_non_projection_arg(p)
    p.set_defaults(func=run_lcdd)


def run_sft(args) -> int:
    from ..train import train_sft

    model, tok = io.load_base(args)
    if args.tiny:
        model = copy.deepcopy(model)  # the tiny base stays reproducible from its seed; train a copy
    res = train_sft(model, io.load_data(args), tok, out_dir=args.out, config=io.train_config(args),
                    resume=args.resume, train="all" if args.train_all else "projections")
    last = res.log[-1] if res.log else {}
    print(f"SFT done: {last.get('step', 0)} steps, final task loss {last.get('task_loss', float('nan')):.4f}; "
          f"model in {res.out_dir / 'model'}, curves in {res.out_dir / 'curves.png'}")
    return 0


def run_lcdd(args) -> int:
    from ..dual import DualController
    from ..train import train_lcdd

    base, tok = io.load_base(args)
    sft = io.load_model(args.sft, args)
    tok = io.load_tokenizer(args.sft) or tok
    ctl = DualController(budget_ratio=args.budget_ratio, lambda_init=args.lambda_init, lambda_lr=args.lambda_lr,
                         warmup_steps=args.warmup)
    res = train_lcdd(sft, base, io.load_data(args), tok, out_dir=args.out, controller=ctl, resume=args.resume,
                     config=io.train_config(args, mask_lr=args.mask_lr), non_projection=args.non_projection)
    s = res.carrier.stats()["overall"]
    n = res.carrier.num_parameters()
    print(f"LCDD done: {res.log[-1]['step']} steps, λ {res.controller.lam:.4g}, mask sparsity {s['sparsity']:.1%}; "
          f"carrier ({n['ratio']:.2%} of the projection weights) in {res.out_dir / 'carrier'}")
    return 0
