"""Autograd Functions over the core operators: the forward calls the core on torch tensors (any
device, no copies) and the backward calls the core's analytic VJP.

Each Function saves only its inputs; intermediates are recomputed in backward.  Use these to
compose your own adapters; :func:`superlora_delta` runs a whole :class:`tensoradapt.SuperLoRA`
generator as one Function; :func:`glora_weight_bias` is GLoRA's ``(W', b')`` with the core's VJP as
its backward.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from tensoradapt import ops
from tensoradapt.glora import algebra as glora_algebra
from tensoradapt.glora.config import LayerChoice
from tensoradapt.superlora import SuperLoRA

__all__ = [
    "cp_to_tensor",
    "cut",
    "fastfood",
    "fwht",
    "glora_weight_bias",
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


# ------------------------------------------------------------------ torch.compile: one opaque op per component
# Under torch.compile the component's ΔW is the custom operator ``tensoradapt::component_delta`` (and its VJP
# ``tensoradapt::component_delta_vjp``): Dynamo records one node instead of tracing the core's Python, which
# would break the graph at every array-API dispatch.  Operators take tensors, ints and strings only, so a
# component is passed as an integer key into this registry (plan held weakly; the keys die with the plan).
_COMPONENT_KEYS = itertools.count(1)
#: Where a plan holds its keys (a ``_process_*`` attribute: per process, never copied or pickled).
_KEYS_ATTRIBUTE = "_process_torch_component_keys"
_COMPONENTS: dict[int, tuple[weakref.ref[SuperLoRA], tuple[int, ...], tuple[str, ...]]] = {}
_REGISTRY_LOCK = threading.Lock()


def _forget(keys: dict[Any, int]) -> None:
    for key in keys.values():
        _COMPONENTS.pop(key, None)


def component_key(plan: SuperLoRA, targets: tuple[int, ...], names: tuple[str, ...]) -> int:
    """The registry key of component ``(plan, targets, names)`` (made on first use; thread-safe)."""
    key = plan.__dict__.get(_KEYS_ATTRIBUTE, {}).get((targets, names))  # every eager call: no lock once made
    if key is not None:
        return key
    with _REGISTRY_LOCK:
        return _component_key(plan, targets, names)


def _component_key(plan: SuperLoRA, targets: tuple[int, ...], names: tuple[str, ...]) -> int:
    keys = plan.__dict__.get(_KEYS_ATTRIBUTE)
    if keys is None:  # (copies and pickles of a plan leave the attribute out: SuperLoRA.__getstate__)
        keys = plan.__dict__[_KEYS_ATTRIBUTE] = {}
        weakref.finalize(plan, _forget, keys)
    key = keys.get((targets, names))
    if key is None:
        key = keys[(targets, names)] = next(_COMPONENT_KEYS)
        _COMPONENTS[key] = (weakref.ref(plan), targets, names)
    return key


def _component(key: int) -> tuple[SuperLoRA, tuple[int, ...], tuple[str, ...]]:
    ref, targets, names = _COMPONENTS[key]
    plan = ref()
    if plan is None:  # pragma: no cover - a compiled graph outliving its plan
        raise RuntimeError("the SuperLoRA plan of this compiled component no longer exists")
    return plan, targets, names


def _fresh(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``outputs`` with every tensor that shares storage with an input or an earlier output copied
    (a custom operator's outputs may alias nothing)."""
    seen = {x.untyped_storage().data_ptr() for x in inputs}
    fresh = []
    for d in outputs:
        if d.untyped_storage().data_ptr() in seen:
            d = d.clone()
        seen.add(d.untyped_storage().data_ptr())
        fresh.append(d)
    return fresh


@torch.library.custom_op("tensoradapt::component_delta", mutates_args=())
def _component_delta_op(key: int, values: list[torch.Tensor]) -> list[torch.Tensor]:
    plan, targets, names = _component(key)
    with torch.autocast(device_type=values[0].device.type, enabled=False):
        return _fresh(plan.delta_for(dict(zip(names, values, strict=True)), targets), values)


@_component_delta_op.register_fake
def _component_delta_fake(key: int, values: list[torch.Tensor]) -> list[torch.Tensor]:
    plan, targets, _ = _component(key)
    return [values[0].new_empty(plan.shapes[t]) for t in targets]


@torch.library.custom_op("tensoradapt::component_delta_vjp", mutates_args=())
def _component_vjp_op(key: int, values: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    plan, targets, names = _component(key)
    with torch.autocast(device_type=values[0].device.type, enabled=False):
        cotangents = [g.to(values[0].dtype).contiguous() for g in grads]
        out = plan.vjp_for(dict(zip(names, values, strict=True)), targets, cotangents)
        return _fresh([out[n] for n in names], [*values, *grads])


@_component_vjp_op.register_fake
def _component_vjp_fake(key: int, values: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [v.new_empty(v.shape) for v in values]


def _component_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    key, values = inputs
    ctx.key = key
    ctx.save_for_backward(*values)


def _component_backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple[None, list[torch.Tensor]]:
    values = ctx.saved_tensors
    plan, targets, _ = _component(ctx.key)
    ref = values[0]
    filled = [torch.zeros(plan.shapes[t], dtype=ref.dtype, device=ref.device) if g is None else g
              for g, t in zip(grads, targets, strict=True)]
    return None, _component_vjp_op(ctx.key, list(values), filled)


_component_delta_op.register_autograd(_component_backward, setup_context=_component_setup)


def superlora_component_delta(plan: SuperLoRA, targets: Sequence[int],
                              params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``ΔW_i`` for the targets of one component (see :meth:`tensoradapt.SuperLoRA.components`)
    as one autograd node.

    ``params`` holds exactly the arrays of that component's groups; the backward calls
    :meth:`tensoradapt.SuperLoRA.vjp_for`, so only those groups are differentiated.  Autocast is
    switched off inside, so the reconstruction runs in the parameters' dtype.  Under
    ``torch.compile`` the component is one custom operator (``tensoradapt::component_delta``, its
    VJP ``tensoradapt::component_delta_vjp``), so it adds no graph break; eager calls run the
    autograd Function directly (same values; outputs that share storage are copied only under
    compile).
    """
    if not isinstance(plan, SuperLoRA):
        raise TypeError(f"plan must be a tensoradapt.SuperLoRA, got {type(plan).__name__}")
    names = tuple(sorted(params))
    targets = tuple(int(t) for t in targets)
    values = [params[n] for n in names]
    if not torch.compiler.is_compiling():
        component_key(plan, targets, names)  # registered here, outside any trace (see below)
        return list(_ComponentDelta.apply(plan, targets, names, *values))
    # Under compile the registry is only read: Dynamo defers a traced function's side effects until
    # after its graph has run, so a key made inside the trace would not exist yet when the operator
    # runs.  A component first met inside a trace falls back to the autograd Function (graph breaks);
    # an adapter registers all its components when it is attached.
    key = plan.__dict__.get(_KEYS_ATTRIBUTE, {}).get((targets, names))
    if key is None:
        return list(_ComponentDelta.apply(plan, targets, names, *values))
    return list(_component_delta_op(key, values))


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


# ---------------------------------------------------------------------------------- GLoRA
#: GLoRA's stored tensors, in the order the Function takes them.
GLORA_TENSOR_NAMES = ("A_d", "A_u", "B_d", "B_u", "C_d", "C_u", "D", "E")


class _GLoRAWeightBias(torch.autograd.Function):
    """``(W', b') = tensoradapt.glora.weight_bias(W0, b0, params, choice)``; backward = the core VJP."""

    @staticmethod
    def forward(ctx: Any, choice: LayerChoice, W0: torch.Tensor, b0: torch.Tensor | None,
                *params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        named = {k: p for k, p in zip(GLORA_TENSOR_NAMES, params, strict=True) if p is not None}
        W, b = glora_algebra.weight_bias(W0, b0, named, choice)
        ctx.choice = choice
        ctx.save_for_backward(W0, b0, *params)
        return W, b

    @staticmethod
    def backward(ctx: Any, W_bar: torch.Tensor, b_bar: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        W0, b0, *params = ctx.saved_tensors
        named = {k: p for k, p in zip(GLORA_TENSOR_NAMES, params, strict=True) if p is not None}
        wants_base = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grads = glora_algebra.vjp(W0, b0, named, ctx.choice, W_bar.contiguous(), b_bar, include_base=wants_base)
        return (None, grads.get("W0"), grads.get("b0"),
                *(grads[k] if p is not None else None for k, p in zip(GLORA_TENSOR_NAMES, params, strict=True)))


def glora_weight_bias(W0: torch.Tensor, b0: torch.Tensor | None, params: Mapping[str, torch.Tensor],
                choice: LayerChoice | Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable :func:`tensoradapt.glora.weight_bias` on torch tensors.

    Parameters
    ----------
    W0 : Tensor, shape (o, n)
    b0 : Tensor of shape (o,), or None
    params : mapping of str to Tensor
        ``A_d (o, r)``, ``A_u (r, n)``, ``B_d (o, r)``, ``B_u (r, n)``, ``C_d (n, r)``,
        ``C_u (r, 1)``, ``D (o,)`` (with a bias), ``E (o,)``.
    choice : LayerChoice

    Returns
    -------
    W' : Tensor, shape (o, n)
    b' : Tensor of shape (o,), or None

    The backward pass calls :func:`tensoradapt.glora.vjp` (gradients reach ``W0``/``b0``
    too when they require grad).
    """
    choice = LayerChoice.from_dict(choice)
    return _GLoRAWeightBias.apply(choice, W0, b0, *(params.get(k) for k in GLORA_TENSOR_NAMES))
