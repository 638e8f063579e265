"""Data parallelism and FSDP2 (``fully_shard``): DTensor detection, gathering, refusals.

Nothing here imports ``torch.distributed``: a DTensor or an FSDP module can exist only once torch
has imported those modules itself, so their presence in ``sys.modules`` is checked first.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["dtensor_type", "fsdp_sharded", "gather_full", "refuse_if_sharded", "refuse_sharded_values",
           "writes_here"]


def dtensor_type() -> type | None:
    """``DTensor`` when ``torch.distributed.tensor`` was imported (no DTensor can exist before), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def fsdp_sharded(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules was sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)  # None: never imported
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


def refuse_if_sharded(model: nn.Module, what: str) -> None:
    """``RuntimeError`` when ``model`` is sharded by FSDP2: ``what`` (``merge()``, ``detach()``…)
    would write into sharded parameters (or take modules out of FSDP's parameter groups)."""
    if fsdp_sharded(model):
        raise RuntimeError(
            f"{what} is not supported on a model sharded by FSDP2 (fully_shard): its weights are sharded "
            "DTensors and FSDP keeps managing the adapter's tensors. Save the adapter (adapter.save(...) on "
            "every rank) and load it onto an unsharded model, then merge or detach there. The model was not changed"
        )


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor replaced by its full (unsharded) value, detached.

    A collective when there is a DTensor (FSDP2 parameters outside a forward): every rank of its
    mesh must call it with the same names in the same order.  Without DTensors the very same
    tensors come back (no copy).
    """
    dtensor = dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors.values()):
        return tensors
    return {name: t.detach().full_tensor() if isinstance(t, dtensor) else t for name, t in tensors.items()}


def writes_here(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether this process writes a file made of ``tensors``: always, except when some are DTensors
    (a model sharded by FSDP2), where the rank at mesh coordinate 0 does."""
    dtensor = dtensor_type()
    sharded = [t for t in tensors.values() if dtensor is not None and isinstance(t, dtensor)]
    if not sharded:
        return True
    coordinate = sharded[0].device_mesh.get_coordinate()
    return coordinate is not None and all(c == 0 for c in coordinate)


def refuse_sharded_values(values: Any) -> None:
    """``RuntimeError`` when one of ``values`` (the adapter tensors a layer is about to use) is a DTensor.

    Under FSDP2 the adapter's tensors are plain (all-gathered) tensors inside the root module's
    forward; they are still sharded when a wrapped layer runs outside it, or when
    ``model.tensoradapt`` (or the adapter) was given its own ``fully_shard`` group, whose forward
    never runs because the wrapped layers use its tensors directly.
    """
    if torch.compiler.is_compiling():  # nothing to check in a traced graph (and no graph break for it)
        return
    dtensor = dtensor_type()
    if dtensor is not None and any(isinstance(v, dtensor) for v in values):
        raise RuntimeError(
            "the adapter's tensors are sharded DTensors here: under FSDP2 they are gathered by the forward "
            "of the FSDP group that holds them. Call fully_shard(model) on the root after the blocks and give "
            "model.tensoradapt no fully_shard of its own (the wrapped layers use its tensors directly), and run "
            "adapted layers inside the model's forward"
        )
