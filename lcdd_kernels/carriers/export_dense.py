"""Dense parts of a carrier (format v2: ``Carrier.dense``, parameter path -> the LCDD model's value)
in a PEFT adapter: where each can go exactly, and a refusal naming what would be lost otherwise.

- a projection's bias: PEFT's ``lora_bias`` (``lora_B.bias`` = SFT − base bias; needs the base
  model). PEFT has one switch for all LoRA modules, so the others get zero biases; SHiRA has none.
- any other parameter (norm weights, embeddings / lm_head): ``modules_to_save``, whose copy of the
  module replaces the base's on load.
- vLLM 0.32 loads neither from an adapter: a vLLM-targeted export refuses them unless
  ``drop_dense=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .carrier import Carrier

@dataclass
class _DensePlan:
    """How each dense part goes into the adapter: ``lora_bias`` (a projection's bias: PEFT's
    ``lora_bias``, lora_B.bias = SFT − base), ``modules_to_save`` (any other module, e.g. a norm:
    PEFT keeps the adapter's copy of the whole module), or dropped (``drop_dense``)."""

    lora_bias: list[str] = field(default_factory=list)
    modules_to_save: dict[str, list[str]] = field(default_factory=dict)  # module -> its dense params
    dropped: list[str] = field(default_factory=list)

    @property
    def exported(self) -> list[str]:
        return sorted(self.lora_bias + [n for names in self.modules_to_save.values() for n in names])


def _listing(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def dense_plan(carrier: Carrier, kind: str, target: str, drop_dense: bool, base_model) -> _DensePlan:
    """Where the carrier's dense parts go; raises when the target cannot hold them exactly and
    ``drop_dense`` was not given (saying what would be lost and the switch)."""
    dense = dict(getattr(carrier, "dense", None) or {})
    plan = _DensePlan()
    if not dense:
        return plan
    lose = ("the served model would not be the carrier's model: what SFT changed there would be lost. Pass "
            "drop_dense=True (CLI: --drop-dense) to export without them knowingly")
    if target == "vllm":
        if not drop_dense:
            raise ValueError(
                f"export_peft(target='vllm'): the carrier has {len(dense)} dense parts ({_listing(dense)}) that vLLM "
                f"cannot load with a LoRA adapter (vLLM 0.32 takes no modules_to_save but classifier heads and no "
                f"LoRA biases); {lose}, or serve this carrier with the package's CarrierBank / apply_carrier")
        plan.dropped = sorted(dense)
        return plan
    projections = set(carrier.modules)
    biases = sorted(n for n in dense if n.rsplit(".", 1)[0] in projections)
    others = sorted(set(dense) - set(biases))
    if biases and kind == "shira":
        if not drop_dense:
            raise ValueError(f"export_peft(kind='shira'): the carrier changes {len(biases)} projection biases "
                             f"({_listing(biases)}); PEFT's SHiRA has no bias and a SHiRA target cannot also be "
                             f"in modules_to_save. Export kind='lora' (it holds them as LoRA biases), or: {lose}")
        plan.dropped += biases
    elif biases:
        if base_model is None and not drop_dense:
            raise ValueError(f"export_peft: the carrier changes {len(biases)} projection biases ({_listing(biases)}); "
                             "a LoRA holds them as lora_B.bias = SFT bias − base bias, which needs the base model: "
                             f"pass base_model= (CLI: --base DIR). Or: {lose}")
        if base_model is None:
            plan.dropped += biases
        else:
            plan.lora_bias = biases
    for n in others:
        plan.modules_to_save.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return plan


def add_dense(carrier: Carrier, plan: _DensePlan, config: dict, tensors: dict, dtype, base_model,
              allow_fingerprint_mismatch: bool, prefix: str) -> None:
    """Write the planned dense parts the way PEFT saves them (keys without the adapter name):
    ``base_model.model.<module>.lora_B.bias`` for LoRA biases (zeros on every other LoRA module:
    PEFT's ``lora_bias`` is one switch for all), ``base_model.model.<module>.<param>`` for every
    parameter of a ``modules_to_save`` module (its base value where SFT did not change it)."""
    if not (plan.lora_bias or plan.modules_to_save):
        return
    dense = carrier.dense
    params = {}
    if base_model is not None:
        from .compat import check_compatible

        check_compatible(base_model, carrier, allow_fingerprint_mismatch)
        params = dict(base_model.named_parameters())
    if plan.lora_bias:
        config["lora_bias"] = True
        for path in carrier.modules:
            n = tensors[f"{prefix}{path}.lora_B.weight"].shape[0]
            name = f"{path}.bias"
            if name in plan.lora_bias:
                diff = dense[name].double() - params[name].detach().double().cpu()
            else:
                diff = torch.zeros(n, dtype=torch.float64)
            tensors[f"{prefix}{path}.lora_B.bias"] = diff.to(dtype).contiguous()
    if plan.modules_to_save:
        config["modules_to_save"] = sorted(plan.modules_to_save)
        for module, names in plan.modules_to_save.items():
            own = {n.rsplit(".", 1)[1] for n in names}
            if base_model is not None:
                mod_params = [k for k in params if k.rsplit(".", 1)[0] == module]
                missing = [k for k in mod_params if k.rsplit(".", 1)[1] not in own]
            else:
                missing = []
            for k in missing:
                tensors[f"{prefix}{k}"] = params[k].detach().to("cpu", dtype).contiguous()
            for n in names:
                tensors[f"{prefix}{n}"] = dense[n].detach().to("cpu", dtype).contiguous()
