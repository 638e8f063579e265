"""Autograd Functions over the core operators: the forward calls the core on torch tensors (any
device, no copies) and the backward calls the core's analytic VJP.

Each Function saves only its inputs; intermediates are recomputed in backward.  Use these to
compose your own adapters; :func:`superlora_delta` runs a whole :class:`tensoradapt.SuperLoRA`
generator as one Function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from tensoradapt import ops
from tensoradapt.superlora import SuperLoRA

__all__ = [
    "cp_to_tensor",
    "cut",
    "fastfood",
    "fwht",
    "kron",
    "pad",
    "shuffle",
    "superlora_component_delta",
    "superlora_delta",
    "tucker_to_tensor",
]


def _own(result: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """A custom Function must not return a view of an input: copy if storage is shared."""
    for x in inputs:
        if x is not None and result.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return result.clone()
    return result


def _no_autocast(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Function's forward/backward with autocast off, so that reconstruction, projections
    and VJPs compute in their inputs' dtype (fp32 parameters stay fp32 inside a bf16/fp16 region)."""

    @functools.wraps(method)
    def wrapped(ctx: Any, *args: Any) -> Any:
        ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if ref is None:
            return method(ctx, *args)
        with torch.autocast(device_type=ref.device.type, enabled=False):
            return method(ctx, *args)

    return wrapped


class _Tucker(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, core: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(core, *factors)
        return ops.tucker_to_tensor(core, list(factors))

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        core, *factors = ctx.saved_tensors
        core_grad, factor_grads = ops.tucker_vjp(core, factors, grad.contiguous())
        return (core_grad, *factor_grads)


class _CP(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, weights: torch.Tensor | None, *factors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, *factors)
        return ops.cp_to_tensor(weights, list(factors))

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, *factors = ctx.saved_tensors
        weights_grad, factor_grads = ops.cp_vjp(weights, factors, grad.contiguous())
        return (weights_grad, *factor_grads)


class _Kron(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        return ops.kron(list(tensors))

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(ops.kron_vjp(list(ctx.saved_tensors), grad.contiguous()))


class _Cut(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.shape = tuple(x.shape)
        return _own(ops.cut(x, n), x)

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ops.pad(grad.contiguous(), ctx.shape), None


class _Pad(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        ctx.n = v.shape[0]
        return _own(ops.pad(v, shape), v)

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ops.cut(grad.contiguous(), ctx.n), None


class _Linear(torch.autograd.Function):
    """A fixed linear operator with ``apply``/``adjoint`` (Shuffle, Fastfood, FWHT)."""

    @staticmethod
    @_no_autocast
    def forward(ctx: Any, x: torch.Tensor, op: Any) -> torch.Tensor:
        ctx.op = op
        return _own(op.apply(x), x)

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.op.adjoint(grad.contiguous()), None


class _FWHT(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, x: torch.Tensor, axis: int) -> torch.Tensor:
        ctx.axis = axis
        return ops.fwht(x, axis)

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ops.fwht(grad.contiguous(), ctx.axis), None  # H is symmetric


class _SuperLoRADelta(torch.autograd.Function):
    @staticmethod
    @_no_autocast
    def forward(ctx: Any, plan: SuperLoRA, names: tuple[str, ...], *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.names = plan, names
        ctx.save_for_backward(*values)
        params = dict(zip(names, values, strict=True))
        return tuple(_own(d, *values) for d in plan.delta(params))

    @staticmethod
    @_no_autocast
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        values = ctx.saved_tensors
        params = dict(zip(ctx.names, values, strict=True))
        ref = values[0]
        cotangents = [
            torch.zeros(shape, dtype=ref.dtype, device=ref.device) if g is None else g.contiguous()
            for g, shape in zip(grads, ctx.plan.shapes, strict=True)
        ]
        param_grads = ctx.plan.vjp(params, cotangents)
        return (None, None, *(param_grads[name] for name in ctx.names))


class _ComponentDelta(torch.autograd.Function):
    """``ΔW`` of one :meth:`SuperLoRA.components` entry from that component's arrays only."""

    @staticmethod
    @_no_autocast
    def forward(ctx: Any, plan: SuperLoRA, targets: tuple[int, ...], names: tuple[str, ...],
                *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.targets, ctx.names = plan, targets, names
        # The inputs are leaf parameters: keep references instead of save_for_backward, so that
        # activation checkpointing (which re-runs a region until it has recovered every tensor the
        # region saved) sees the same saved tensors whether a layer generated ΔW or reused it.
        ctx.values = values
        ctx.versions = tuple(v._version for v in values)
        out = plan.delta_for(dict(zip(names, values, strict=True)), targets)
        return tuple(_own(d, *values) for d in out)

    @staticmethod
    @once_differentiable
    @_no_autocast
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        changed = [n for n, v, version in zip(ctx.names, ctx.values, ctx.versions, strict=True)
                   if v._version != version]
        if changed:
            raise RuntimeError(
                f"adapter parameters {changed[:3]} were modified in place between the forward and the "
                "backward pass (as autograd's saved-tensor check would report); run backward first"
            )
        values = tuple(v.detach() for v in ctx.values)
        ref = values[0]
        cotangents = [
            torch.zeros(ctx.plan.shapes[i], dtype=ref.dtype, device=ref.device) if g is None
            else g.to(ref.dtype).contiguous()
            for g, i in zip(grads, ctx.targets, strict=True)
        ]
        param_grads = ctx.plan.vjp_for(dict(zip(ctx.names, values, strict=True)), ctx.targets, cotangents)
        return (None, None, None, *(param_grads[name] for name in ctx.names))


def superlora_component_delta(plan: SuperLoRA, targets: Sequence[int],
                              params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``ΔW_i`` for the targets of one component (see :meth:`tensoradapt.SuperLoRA.components`)
    as one autograd node.

    ``params`` holds exactly the arrays of that component's groups; the backward calls
    :meth:`tensoradapt.SuperLoRA.vjp_for`, so only those groups are differentiated.  Autocast is
    switched off inside, so the reconstruction runs in the parameters' dtype.
    """
    if not isinstance(plan, SuperLoRA):
        raise TypeError(f"plan must be a tensoradapt.SuperLoRA, got {type(plan).__name__}")
    names = tuple(sorted(params))
    return list(_ComponentDelta.apply(plan, tuple(int(t) for t in targets), names, *(params[n] for n in names)))


def tucker_to_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Differentiable :func:`tensoradapt.ops.tucker_to_tensor` (``C ×_1 A_1 … ×_M A_M``)."""
    return _Tucker.apply(core, *factors)


def cp_to_tensor(weights: torch.Tensor | None, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Differentiable :func:`tensoradapt.ops.cp_to_tensor` (``Σ_j λ_j a_1j ∘ … ∘ a_Mj``)."""
    return _CP.apply(weights, *factors)


def kron(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Differentiable :func:`tensoradapt.ops.kron` (Kronecker product of K splits)."""
    return _Kron.apply(*tensors)


def cut(x: torch.Tensor, n: int) -> torch.Tensor:
    """Differentiable ``Cut_n``: the first ``n`` row-major entries of ``x``."""
    return _Cut.apply(x, n)


def pad(v: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Differentiable ``Cut_nᵀ``: zero-pad ``v`` and reshape to ``shape``."""
    return _Pad.apply(v, tuple(shape))


def shuffle(x: torch.Tensor, op: ops.Shuffle) -> torch.Tensor:
    """Differentiable :meth:`tensoradapt.ops.Shuffle.apply` along the last axis."""
    if not isinstance(op, ops.Shuffle):
        raise TypeError(f"op must be a tensoradapt.ops.Shuffle, got {type(op).__name__}")
    return _Linear.apply(x, op)


def fastfood(x: torch.Tensor, op: ops.Fastfood) -> torch.Tensor:
    """Differentiable :meth:`tensoradapt.ops.Fastfood.apply` along the last axis (16-bit inputs are
    computed in float32 by the core)."""
    if not isinstance(op, ops.Fastfood):
        raise TypeError(f"op must be a tensoradapt.ops.Fastfood, got {type(op).__name__}")
    return _Linear.apply(x, op)


def fwht(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Differentiable unnormalised Walsh–Hadamard transform along ``axis``."""
    return _FWHT.apply(x, axis)


def superlora_delta(plan: SuperLoRA, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``[ΔW_1, …, ΔW_S]`` of ``plan`` as one autograd node: the backward runs ``plan.vjp`` and saves
    only the trainable parameters (every intermediate is recomputed)."""
    if not isinstance(plan, SuperLoRA):
        raise TypeError(f"plan must be a tensoradapt.SuperLoRA, got {type(plan).__name__}")
    names = tuple(sorted(params))
    return list(_SuperLoRADelta.apply(plan, names, *(params[n] for n in names)))
