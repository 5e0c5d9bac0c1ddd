"""The hooks into vLLM 0.32.0's LoRA path (``vllm/lora/``, ``vllm/v1/engine/input_processor.py``).

- ``InputProcessor._validate_lora`` (front end, every request): a carrier directory is validated
  there (:func:`.carrier_dir.load_for_model`, cached per directory and file version), so a bad
  carrier is refused with the package's message in that request's error before it reaches the
  engine, and the engine and other requests carry on.
- ``WorkerLoRAManager.__init__`` / ``_load_adapter`` (worker): a carrier directory is loaded (and
  validated again: the worker reads the files itself) into a LoRA model with no LoRA weights
  that carries the fused carrier entries (:mod:`.slots`); PEFT adapters load as before.
  ``LoRAModelManager._create_merged_loras_inplace`` (which packs LoRA weights and assumes there
  are some) skips a carrier.
- ``LoRAModelManager.activate_adapter`` (worker): when an adapter takes a LoRA slot, every LoRA
  linear layer gets that carrier's entry in that slot, or none (a PEFT LoRA, a dummy). vLLM zeroes
  the slot's LoRA weights for a carrier (it has none), so the LoRA kernels add nothing there.
- ``BaseLinearLayerWithLoRA._apply_lora_to_output`` (every projection): after vLLM's base GEMM
  and LoRA add, the tokens of carrier slots get their carrier (:func:`.carrier_op.add_carriers_`)
  over the punica wrapper's ``token_lora_indices`` (−1: no adapter, the base), converted once per
  step on a CPU (``PunicaWrapperBase._update_base_metadata`` drops the step's copy); a projection
  whose carriers no token of the step uses makes no call. While no active slot holds a LoRA
  adapter (``LoRAModelManager.__init__`` starts so; ``_deactivate_adapter`` /
  ``remove_all_adapters`` keep the set), vLLM's LoRA adds (projections, lm_head, embedding) are
  skipped: no token maps to LoRA weights then, so they would add nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import carrier_dir
from .carrier_op import add_carriers_
from .slots import CarrierSlotWeights, fuse, set_slot

log = logging.getLogger("lcdd_kernels.vllm")

_MARK = "_lcdd_patched"


def _patch(cls, name, make):
    orig = getattr(cls, name)
    if getattr(orig, _MARK, False):
        return
    new = make(orig)
    setattr(new, _MARK, True)
    new.__wrapped__ = orig
    setattr(cls, name, new)


def _parallel_refusal(vllm_config) -> str | None:
    # Tensor parallelism is served (each rank keeps its own rows or columns: .shards). Under
    # pipeline parallelism a rank holds some decoder layers only, which the plugin does not map.
    pp = getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)
    if pp != 1:
        return (f"the lcdd vLLM plugin serves carriers with pipeline_parallel_size=1 only (this engine: {pp}); "
                "split the model with tensor_parallel_size instead (served), or export an exact LoRA (lcdd export) "
                "where its rank allows")
    if getattr(getattr(vllm_config, "lora_config", None), "fully_sharded_loras", False):
        # the fully sharded LoRA layers compute their own path and never reach the carrier hook
        return ("the lcdd vLLM plugin serves carriers without --fully-sharded-loras (fully_sharded_loras=True "
                "here); start vLLM without it (tensor parallelism is served either way)")
    return None


# ----- front end ---------------------------------------------------------------------------

#: carrier directory -> the file versions validated (a changed file is validated again)
_validated: dict[str, tuple] = {}
_VALIDATED_MAX = 1024


def _version_key(path: str):
    d = Path(path)
    return tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(d.iterdir()) if f.is_file())


def validate_request(lora_path: str, vllm_config) -> None:
    """Refuse (CarrierRefused) a carrier that the served model cannot take; cached per directory
    and file version, so each carrier is read once, not per request."""
    path = os.path.abspath(os.path.expanduser(lora_path))
    why = _parallel_refusal(vllm_config)
    if why:
        raise carrier_dir.CarrierRefused(f"carrier {path}: {why}")
    version = _version_key(path)
    if _validated.get(path) == version:
        return
    mc = vllm_config.model_config
    carrier_dir.load_for_model(path, mc.model, mc.hf_config)
    if len(_validated) >= _VALIDATED_MAX:
        _validated.pop(next(iter(_validated)))
    _validated[path] = version


def _make_validate_lora(orig):
    def _validate_lora(self, lora_request):
        orig(self, lora_request)
        if lora_request is not None and carrier_dir.is_carrier_dir(lora_request.lora_path):
            from vllm.exceptions import VLLMValidationError

            try:
                validate_request(lora_request.lora_path, self.vllm_config)
            except (ValueError, OSError) as e:
                raise VLLMValidationError(f"LoRA adapter {lora_request.lora_name!r}: {e}") from e
    return _validate_lora


# ----- worker: loading and slots ------------------------------------------------------------


def _make_init(orig):
    def __init__(self, vllm_config, *args, **kwargs):
        orig(self, vllm_config, *args, **kwargs)
        self._lcdd_model_config = vllm_config.model_config
        self._lcdd_vllm_config = vllm_config
    return __init__


def _make_load_adapter(orig):
    def _load_adapter(self, lora_request):
        if not carrier_dir.is_carrier_dir(lora_request.lora_path):
            return orig(self, lora_request)
        from vllm.lora.lora_model import LoRAModel

        path = os.path.abspath(os.path.expanduser(lora_request.lora_path))
        why = _parallel_refusal(self._lcdd_vllm_config)
        if why:
            raise carrier_dir.CarrierRefused(f"carrier {path}: {why}")
        from vllm import envs

        if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
            # that path runs LoRA on a second CUDA stream and never reaches the carrier hook
            raise carrier_dir.CarrierRefused(f"carrier {path}: the lcdd vLLM plugin does not serve carriers with "
                                             "VLLM_LORA_ENABLE_DUAL_STREAM=1; unset it")
        mc = self._lcdd_model_config
        carrier = carrier_dir.load_for_model(path, mc.model, mc.hf_config)
        manager = self._adapter_manager
        dtype = mc.dtype if isinstance(mc.dtype, torch.dtype) else carrier.dtype
        if dtype != carrier.dtype:  # a cast the user should know of: exact only when it widens
            log.warning("lcdd: carrier %s is %s; its deltas are cast to the served dtype %s", path,
                        carrier.dtype, dtype)
        weights = fuse(carrier, manager.modules, manager.packed_modules_mapping, dtype, f"carrier {path}")
        model = LoRAModel(lora_request.lora_int_id, 1, {})
        model.lcdd = weights
        log.info("lcdd: carrier %s loaded as LoRA id %d (%.2f MiB resident, %.2f MiB on disk)", path,
                 lora_request.lora_int_id, weights.nbytes() / 2**20, carrier.nbytes()["total"] / 2**20)
        return model
    return _load_adapter


def _make_merge(orig):
    def _create_merged_loras_inplace(self, lora_model):
        if getattr(lora_model, "lcdd", None) is not None:
            return  # a carrier: no LoRA weights to pack (its entries are fused already)
        return orig(self, lora_model)
    return _create_merged_loras_inplace


def _make_activate(orig):
    def activate_adapter(self, lora_id):
        placed = orig(self, lora_id)
        if placed:
            index = self.lora_index_to_id.index(lora_id)
            weights: CarrierSlotWeights | None = getattr(self._registered_adapters[lora_id], "lcdd", None)
            # Slots whose active adapter has LoRA weights. While there is none, no token maps to
            # LoRA weights (carrier slots are zeroed, free slots unused), so the projections skip
            # vLLM's LoRA kernels. Flags are set here only: a deactivation leaves them on (safe).
            live = _live_slots(self)
            (live.discard if weights is not None else live.add)(index)
            if getattr(self, "punica_wrapper", None) is not None:
                self.punica_wrapper._lcdd_lora_live = bool(live)
            for name, module in self.modules.items():
                if hasattr(module, "output_slices") and hasattr(module, "lora_a_stacked"):
                    module._lcdd_lora_live = bool(live)
                    entry = weights.entries.get(name) if weights is not None else None
                    if entry is not None or getattr(module, "_lcdd_plan", None) is not None:
                        set_slot(module, index, self.lora_slots, entry)
        return placed
    return activate_adapter


def _live_slots(manager) -> set:
    return manager.__dict__.setdefault("_lcdd_lora_slots", set())


def _make_deactivate(orig):
    def _deactivate_adapter(self, lora_id):
        if lora_id in self.lora_index_to_id:
            _live_slots(self).discard(self.lora_index_to_id.index(lora_id))
        return orig(self, lora_id)
    return _deactivate_adapter


def _make_remove_all(orig):
    def remove_all_adapters(self):
        _live_slots(self).clear()
        return orig(self)
    return remove_all_adapters


# ----- worker: the projections --------------------------------------------------------------


#: the punica wrapper's attribute that holds the step's (int32 ids, slots used), on a CPU
_IDS = "_lcdd_step_ids"


def _step_ids(punica, n: int, device) -> tuple[torch.Tensor, frozenset | None]:
    """The step's slot per token as int32 (−1: the base), padded with −1 to ``n`` tokens, and on a
    CPU the set of slots it uses. On a CPU both are built once per step (the first projection) and
    kept on the punica wrapper until vLLM updates the mapping (``_update_base_metadata``): a
    conversion and a slice per projection measured about 2% of a decode step (16 sequences,
    Qwen3-0.6B's layer shapes, vLLM's CPU build), and a projection whose carriers no token of the
    step uses is skipped without a call. Elsewhere the ids are built per call (a captured CUDA graph
    replays the conversion) and the slots are None (reading them would synchronise)."""
    cpu = device.type == "cpu"
    if cpu:
        cached = punica.__dict__.get(_IDS)
        if cached is not None and cached[0].shape[0] == n:
            return cached
    ids = punica.token_lora_indices
    if ids.shape[0] != n:  # padded batches: the padding tokens get no carrier
        pad = ids.new_full((n,), -1)
        m = min(n, ids.shape[0])
        pad[:m] = ids[:m]
        ids = pad
    ids = ids.to(torch.int32)
    if not cpu:
        return ids, None
    cached = punica.__dict__[_IDS] = (ids, frozenset(ids.unique().tolist()))
    return cached


def _make_update_metadata(orig):
    def _update_base_metadata(self, *args, **kwargs):
        self.__dict__.pop(_IDS, None)
        return orig(self, *args, **kwargs)
    return _update_base_metadata


def _make_manager_init(orig):
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        # No slot holds a LoRA adapter yet, so vLLM's LoRA adds would add nothing: skipped until
        # activate_adapter places one (the projections' flag, and the punica wrapper's for the
        # lm_head and embedding adds, about 1% of a decode step on vLLM's CPU build).
        for module in self.modules.values():
            if hasattr(module, "output_slices") and hasattr(module, "lora_a_stacked"):
                module._lcdd_lora_live = False
                module._lcdd_plan = None  # set here: a miss would go through the layer's __getattr__
        punica = getattr(self, "punica_wrapper", None)
        if punica is not None:
            punica._lcdd_lora_live = False
            for name in ("add_lora_logits", "add_lora_embedding"):
                if hasattr(punica, name):
                    setattr(punica, name, _skip_unless_live(punica, getattr(punica, name)))
    return __init__


def _skip_unless_live(punica, add):
    def maybe_add(y, *args, **kwargs):
        # y is returned as is: vLLM adds in place on every platform the plugin serves
        return add(y, *args, **kwargs) if punica.__dict__.get("_lcdd_lora_live", True) else y
    return maybe_add


def _make_apply_lora(orig):
    def _apply_lora_to_output(self, x, output):
        if getattr(self, "_lcdd_lora_live", True):
            output = orig(self, x, output)
        plan = getattr(self, "_lcdd_plan", None)
        if plan is None:
            return output
        out2 = output.flatten(0, -2) if output.ndim > 2 else output
        x2 = x.flatten(0, -2) if x.ndim > 2 else x
        ids, used = _step_ids(self.punica_wrapper, out2.shape[0], out2.device)
        if used is None or not used.isdisjoint(self._lcdd_slots):
            add_carriers_(out2, x2, plan, ids)
        return output
    return _apply_lora_to_output


def install() -> None:
    """Install the hooks (idempotent: vLLM loads plugins in every process, possibly twice)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.engine.input_processor import InputProcessor

    _patch(InputProcessor, "_validate_lora", _make_validate_lora)
    _patch(WorkerLoRAManager, "__init__", _make_init)
    _patch(WorkerLoRAManager, "_load_adapter", _make_load_adapter)
    _patch(LoRAModelManager, "_create_merged_loras_inplace", _make_merge)
    _patch(LoRAModelManager, "__init__", _make_manager_init)
    _patch(LoRAModelManager, "activate_adapter", _make_activate)
    _patch(LoRAModelManager, "_deactivate_adapter", _make_deactivate)
    _patch(LoRAModelManager, "remove_all_adapters", _make_remove_all)
    _patch(BaseLinearLayerWithLoRA, "_apply_lora_to_output", _make_apply_lora)
    _patch(PunicaWrapperBase, "_update_base_metadata", _make_update_metadata)
