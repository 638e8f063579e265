"""A target's forward that keeps only the factors: ``y = f(x, W + ΔW_i)`` with ``ΔW_i``
generated inside the forward and regenerated inside the backward (docs/math.md §6.4).

Autograd saves the layer input ``x`` (which the base layer's own backward needs anyway), the
frozen weight (a reference) and the adapter's factors; never ``ΔW_i`` or ``W + ΔW_i``.  A train
step therefore holds one target's ``ΔW`` at a time, not the sum over the model's targets.

Where ``ΔW_i`` comes from is a *source*:

* :class:`TargetSlice`: a target whose update the core generates on its own
  (:meth:`tensoradapt.SuperLoRA.sliceable`: no projection), at a cost proportional to the
  target's slice of its group (:meth:`~tensoradapt.SuperLoRA.delta_target` /
  :meth:`~tensoradapt.SuperLoRA.vjp_target`);
* :class:`ComponentSlot`: a target of a projected component (Fastfood, Shuffle), whose outputs
  need the whole group transform.  The component's ``ΔW`` list is computed once per forward
  (:class:`ComponentPass`), freed when the forward ends, recomputed once in the backward, and
  the targets' cotangents are collected there; the component's VJP runs once, in the backward of
  the :class:`ComponentPass` handle, after every target of the pass has handed in its cotangent
  (autograd's dependency count orders it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from tensoradapt import SuperLoRA

from .functional import superlora_component_delta
from .modules import base_forward, graph_task_id

__all__ = ["ComponentPass", "ComponentSlot", "TargetSlice", "adapted_forward", "add_update", "component_handle"]


def _check_versions(names: Sequence[str], values: Sequence[torch.Tensor], versions: Sequence[int]) -> None:
    changed = [n for n, v, version in zip(names, values, versions, strict=True) if v._version != version]
    if changed:
        raise RuntimeError(
            f"adapter parameters {changed[:3]} were modified in place between the forward and the "
            "backward pass (as autograd's saved-tensor check would report); run backward first"
        )


class TargetSlice:
    """``ΔW_i`` of one target generated on its own from its groups' arrays (no projection).

    ``inputs`` are the arrays ``names`` (those of ``plan.groups_for([index])``, sorted)."""

    def __init__(self, plan: SuperLoRA, index: int, names: tuple[str, ...]) -> None:
        self.plan, self.index, self.names = plan, index, names

    def delta(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.plan.delta_target(dict(zip(self.names, inputs, strict=True)), self.index)

    def vjp(self, inputs: Sequence[torch.Tensor], cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grads = self.plan.vjp_target(dict(zip(self.names, inputs, strict=True)), self.index, cotangent)
        return tuple(grads[n] for n in self.names)

    def graph_delta(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``ΔW`` as an autograd node of ``inputs`` (its backward :meth:`vjp`, once differentiable)."""
        return _SliceDelta.apply(self, *inputs)

    @property
    def differentiates_inputs(self) -> bool:
        """The parameters are this source's autograd inputs (their gradients are returned)."""
        return True


class _SliceDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, source: TargetSlice, *values: torch.Tensor) -> torch.Tensor:
        ctx.source = source
        ctx.save_for_backward(*values)
        with torch.autocast(values[0].device.type, enabled=False):
            return source.delta(values)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(grad.device.type, enabled=False):
            return (None, *ctx.source.vjp(ctx.saved_tensors, grad.to(ctx.saved_tensors[0].dtype).contiguous()))


class ComponentPass:
    """One forward pass of a projected component: its targets' ``ΔW`` (computed on first use,
    released when the forward ends and recomputed once in the backward) and the cotangents its
    targets hand in during the backward.

    With layout ``"fold"`` (no global shuffle) each target's cotangent is added straight into its
    group's flat cotangent array (:meth:`tensoradapt.SuperLoRA.cotangent_length`: padded for a
    Fastfood adjoint that works in place), so the backward holds one array per group rather than a
    copy of every target's; otherwise the per-target cotangents are kept for
    :meth:`~tensoradapt.SuperLoRA.vjp_for`."""

    def __init__(self, plan: SuperLoRA, targets: tuple[int, ...], names: tuple[str, ...],
                 values: Sequence[torch.Tensor], *, transient: bool = False,
                 find_outputs: Callable[[ComponentPass], list[torch.Tensor] | None] | None = None) -> None:
        self.plan, self.targets, self.names = plan, targets, names
        self.live = tuple(values)  # the parameters (a create_graph backward differentiates through them)
        self.values = tuple(v.detach() for v in values)  # detached views share the version counters
        self.versions = tuple(v._version for v in values)
        self.outputs: list[torch.Tensor] | None = None
        #: released after each use (a layer called outside a model forward: nothing shares the pass)
        self.transient = transient
        #: another pass's outputs with the same parameters in this backward (activation checkpointing
        #: recomputing a block builds a second pass; the two then hold one copy)
        self.find_outputs = find_outputs
        self.by_group = plan.config.layout == "fold" and not plan.global_shuffle
        self.cotangents: dict[int, torch.Tensor] = {}  # group (by_group) or position -> cotangent
        self._clearing: set[int] = set()  # backward passes that reset the cotangents when they end

    def _params(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values, strict=True))

    def output(self, position: int) -> torch.Tensor:
        if self.outputs is None:
            _check_versions(self.names, self.values, self.versions)  # a backward after an in-place change
            shared = None if self.find_outputs is None else self.find_outputs(self)
            if shared is not None:
                self.outputs = shared
            else:
                with torch.no_grad(), torch.autocast(self.values[0].device.type, enabled=False):
                    self.outputs = self.plan.delta_for(self._params(), self.targets)
        out = self.outputs[position]
        if self.transient:
            self.outputs = None
        return out

    def release(self) -> None:
        """Free the generated ``ΔW`` (the backward recomputes it once)."""
        self.outputs = None

    def add_cotangent(self, position: int, cotangent: torch.Tensor) -> None:
        self._clear_when_this_backward_ends()
        ref = self.values[0]
        cotangent = cotangent.to(ref.dtype)
        if not self.by_group:
            known = self.cotangents.get(position)
            self.cotangents[position] = cotangent if known is None else known + cotangent
            return
        flat = cotangent.reshape(-1)
        at = 0
        for g, a, b in self.plan.grouping.target_pieces(self.targets[position]):
            buffer = self.cotangents.get(g)
            if buffer is None:
                buffer = self.cotangents[g] = torch.zeros(self.plan.cotangent_length(g), dtype=ref.dtype,
                                                          device=ref.device)
            buffer[a:b] += flat[at:at + b - a]
            at += b - a

    def _clear_when_this_backward_ends(self) -> None:
        """A backward that does not reach the pass's handle (``autograd.grad(loss, x)``,
        ``backward(inputs=...)``) must not leave its cotangents for the next one."""
        task = graph_task_id()
        if task < 0 or task in self._clearing:
            return
        self._clearing.add(task)

        def clear() -> None:
            self._clearing.discard(task)
            self.cotangents = {}
            self.outputs = None

        torch.autograd.Variable._execution_engine.queue_callback(clear)

    def finish(self) -> tuple[torch.Tensor, ...]:
        """The component's VJP over the collected cotangents (zeros for targets without one)."""
        _check_versions(self.names, self.values, self.versions)
        self.outputs = None  # no target of this pass needs ΔW any more
        ref = self.values[0]
        cotangents, self.cotangents = self.cotangents, {}
        with torch.autocast(ref.device.type, enabled=False):
            if not self.by_group:
                full = [cotangents.get(p, None) for p in range(len(self.targets))]
                full = [torch.zeros(self.plan.shapes[t], dtype=ref.dtype, device=ref.device) if c is None
                        else c.contiguous() for c, t in zip(full, self.targets, strict=True)]
                grads = self.plan.vjp_for(self._params(), self.targets, full)
            else:
                grads = {}
                params = self._params()
                for g in sorted(cotangents):
                    own = {n: params[n] for n in self.plan.parameter_shapes([g])}
                    grads.update(self.plan.vjp_group(own, g, cotangents.pop(g)))
        return tuple(grads[n] if n in grads else torch.zeros_like(v) for n, v in zip(self.names, self.values,
                                                                                      strict=True))


class _ComponentHandle(torch.autograd.Function):
    """A 0-entry tensor that ties a :class:`ComponentPass` to the autograd graph: every target of
    the pass takes it as an input, so its backward (the component's VJP) runs after theirs."""

    @staticmethod
    def forward(ctx: Any, state: ComponentPass, *values: torch.Tensor) -> torch.Tensor:
        ctx.state = state
        return values[0].new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *ctx.state.finish())


def component_handle(state: ComponentPass, values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The autograd handle of ``state`` (see :class:`ComponentPass`)."""
    return _ComponentHandle.apply(state, *values)


class ComponentSlot:
    """Target ``position`` of a :class:`ComponentPass`; its one input is the pass's handle."""

    def __init__(self, state: ComponentPass, position: int) -> None:
        self.state, self.position = state, position

    def delta(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.state.output(self.position)

    def vjp(self, inputs: Sequence[torch.Tensor], cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.state.add_cotangent(self.position, cotangent)
        return (torch.zeros_like(inputs[0]),)

    def graph_delta(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """``ΔW`` differentiable in the live parameters (the component materialised: a create_graph
        backward only)."""
        state = self.state
        params = dict(zip(state.names, state.live, strict=True))
        return superlora_component_delta(state.plan, state.targets, params)[self.position]

    @property
    def differentiates_inputs(self) -> bool:
        """The handle, not the parameters, is this source's input (their gradients go through the pass)."""
        return False


# ---------------------------------------------------------------------------------- the layer maths
def _effective(layer: Any, weight: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` in the stored layout and the weight's dtype, added in the wider of the two dtypes
    and rounded once (a bf16 weight with an fp32 update); ``ΔW`` alone when there is no weight (a
    quantised base)."""
    update = layer.view.update_to_weight(delta)
    if weight is None:
        return update
    return add_update(weight, update.to(weight.device))


def add_update(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` in ``W``'s dtype, added in the wider of the two dtypes and rounded once (a bf16
    weight with an fp32 update; a bf16 adapter never rounds an fp32 weight)."""
    wide = torch.promote_types(weight.dtype, update.dtype)
    if weight.dtype == wide:
        return weight + update.to(wide)
    return (weight.to(wide) + update.to(wide)).to(weight.dtype)


def _layer_grads(layer: Any, x: torch.Tensor, effective: torch.Tensor, bias: torch.Tensor | None,
                 grad: torch.Tensor, needs: tuple[bool, bool, bool]) -> tuple[Any, Any, Any]:
    """``(∂L/∂x, ∂L/∂W_eff, ∂L/∂b)`` of ``y = f(x, W_eff) + b`` given ``∂L/∂y`` (``needs``: x, bias,
    W_eff; what is not needed is None)."""
    kind = layer.kind
    if kind in ("linear", "conv1d", "quantized"):
        flat_grad = grad.reshape(-1, grad.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1]).to(flat_grad.dtype)
        eff = effective.to(grad.dtype)
        if kind == "conv1d":  # y = x W_eff, W_eff stored (in, out)
            grad_x = (grad @ eff.t()) if needs[0] else None
            grad_w = (flat_x.t() @ flat_grad) if needs[2] else None
        else:  # y = x W_effᵀ
            grad_x = (grad @ eff) if needs[0] else None
            grad_w = (flat_grad.t() @ flat_x) if needs[2] else None
        grad_b = flat_grad.sum(0) if needs[1] else None
        return grad_x, grad_w, grad_b
    # convolutions and embeddings: the functional forward's own backward on the recomputed output
    with torch.enable_grad():
        xr = x.detach().requires_grad_(needs[0] and x.is_floating_point())
        er = effective.detach().requires_grad_(needs[2])
        br = None if bias is None else bias.detach().requires_grad_(needs[1])
        out = base_forward(layer.base_layer, kind, xr, er, br)
        wanted = [t for t in (xr, er, br) if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    grad_x = next(got) if xr.requires_grad else None
    grad_w = next(got) if er.requires_grad else None
    grad_b = next(got) if br is not None and br.requires_grad else None
    return grad_x, grad_w, grad_b


def _apply(layer: Any, x: torch.Tensor, effective: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if layer.kind == "quantized":  # the adapter's part only: x ΔWᵀ in the update's dtype, on x's device
        return torch.nn.functional.linear(x.to(effective.dtype), effective.to(x.device))
    return base_forward(layer.base_layer, layer.kind, x, effective, bias)


class _AdaptedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, layer: Any, source: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.layer, ctx.source = layer, source
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.x_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):  # the factors' maths in their own dtype
            delta = source.delta(inputs)
        ctx.save_for_backward(x, weight, bias, *inputs)
        return _apply(layer, x, _effective(layer, weight, delta), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: an input-gradient penalty differentiates ∂L/∂x
            return _graph_backward(ctx, grad)
        x, weight, bias, *inputs = ctx.saved_tensors
        layer, source = ctx.layer, ctx.source
        device, autocast, dtype = ctx.autocast
        needs_update = ctx.needs_input_grad[3] or any(ctx.needs_input_grad[5:])
        with torch.autocast(device, enabled=False):
            delta = source.delta(inputs)
        update_dtype, update_device = delta.dtype, delta.device
        effective = _effective(layer, weight, delta)
        del delta
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            if layer.kind == "quantized":
                x = x.to(effective.dtype)
                effective = effective.to(x.device)
            needs = (ctx.needs_input_grad[2], bias is not None and ctx.needs_input_grad[4], needs_update)
            grad_x, grad_w, grad_b = _layer_grads(layer, x, effective, bias, grad, needs)
        del effective
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_w is None:
            return (None, None, grad_x, None, grad_b, *(None for _ in inputs))
        grad_weight = grad_w.to(weight.dtype) if weight is not None and ctx.needs_input_grad[3] else None
        update_grad = layer.view.weight_to_update(grad_w).to(update_device, update_dtype)  # the factors' device
        del grad_w
        with torch.autocast(device, enabled=False):
            grads = source.vjp(inputs, update_grad)
        return (None, None, grad_x, grad_weight, grad_b, *grads)


def _graph_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward as a graph (``create_graph=True``): the forward recomputed with ``ΔW`` an autograd
    node of the parameters (:meth:`TargetSlice.graph_delta`; a projected target materialises its
    component), so ``∂L/∂x`` can be differentiated again, as in gradient penalties.  Differentiating
    the parameters' own gradients again is refused (the generator's VJP is once differentiable)."""
    x, weight, bias, *inputs = ctx.saved_tensors
    layer, source = ctx.layer, ctx.source
    device, autocast, dtype = ctx.autocast
    with torch.enable_grad():
        xr = x.detach().requires_grad_(ctx.needs_input_grad[2])
        with torch.autocast(device, enabled=False):
            delta = source.graph_delta(inputs)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = _apply(layer, xr, _effective(layer, weight, delta), bias)
        wanted = [(2, xr), (3, weight), (4, bias)]
        if source.differentiates_inputs:
            wanted += list(enumerate(inputs, start=5))
        wanted = [(i, t) for i, t in wanted if t is not None and ctx.needs_input_grad[i] and t.requires_grad]
        got = torch.autograd.grad(out, [t for _, t in wanted], grad, create_graph=True, allow_unused=True)
    result: list[torch.Tensor | None] = [None] * (5 + len(inputs))
    for (i, _), g in zip(wanted, got, strict=True):
        result[i] = g
    if not source.differentiates_inputs and any(ctx.needs_input_grad[5:]):  # the pass collects ∂L/∂ΔW
        with torch.no_grad():
            eff = _effective(layer, weight, delta.detach())
            _, grad_w, _ = _layer_grads(layer, x, eff, bias, grad.detach(), (False, False, True))
            result[5:] = source.vjp(inputs, layer.view.weight_to_update(grad_w).to(delta.dtype))
    if result[2] is not None:
        result[2] = result[2].to(ctx.x_dtype)
    return tuple(result)


def adapted_forward(layer: Any, source: Any, x: torch.Tensor, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``f(x, W + ΔW)`` of ``layer`` (a wrapper with ``base_layer``, ``kind``, ``view``) where
    ``source.delta(inputs)`` is ``ΔW`` in ``(o, n)`` form; ``weight=None`` (a quantised base) gives
    the adapter's part ``x ΔWᵀ`` alone.  Saves ``x``, ``weight``, ``bias`` and ``inputs`` only."""
    return _AdaptedForward.apply(layer, source, x, weight, bias, *inputs)
