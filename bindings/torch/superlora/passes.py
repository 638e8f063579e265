"""Where a SuperLoRA adapter's ``ΔW`` comes from in a step: per-target slices, per-component passes,
and the caches that make each component's ``ΔW`` once per model forward (per thread) and once per
backward pass under activation checkpointing.

:class:`DeltaPasses` is a mixin of :class:`.adapter.SuperLoRAAdapter` (it reads the adapter's
``plan``, ``params`` and component tables); docs/math.md §6.4 and §6.5 give the paths.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..distributed import gather_full, refuse_sharded_values
from ..functional import superlora_component_delta
from ..modules import graph_task_id
from ..target_forward import ComponentPass, ComponentSlot, TargetSlice, component_handle

__all__ = ["DeltaPasses", "ForwardState", "safe_key"]

_BACKWARD_LOCK = threading.Lock()  # guards every adapter's backward-pass ΔW caches (short critical sections)


def safe_key(name: str) -> str:
    """A generator parameter name as a ``ParameterDict`` key (``.`` → ``__``)."""
    return name.replace(".", "__")


class ForwardState:
    """One thread's forward-scoped ΔW reuse: nesting depth and ``{(component, grad): (versions, ΔW)}``."""

    def __init__(self) -> None:
        self.depth = 0
        self.cache: dict[tuple[int, bool], Any] | None = None


class DeltaPasses:
    """``ΔW`` of a SuperLoRA adapter's targets: generated, shared within a forward, recomputed in a backward."""

    def _begin_forward(self, module: nn.Module, args: Any) -> None:
        state = self._state.get()
        if state.depth == 0:
            state.cache = {}
        state.depth += 1


    def _end_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        state = self._state.get()
        state.depth = max(0, state.depth - 1)
        if state.depth == 0:
            for entry in (state.cache or {}).values():
                if isinstance(entry[1], ComponentPass):
                    entry[1].release()  # the backward recomputes the component's ΔW once
            state.cache = None

    # ------------------------------------------------------------------ ΔW
    # ------------------------------------------------------------------ ΔW

    def _component_params(self, c: int) -> dict[str, torch.Tensor]:
        params = {name: self.params[safe_key(name)] for name in self._group_names[c]}
        refuse_sharded_values(params.values())  # FSDP2: a clear error instead of DTensor's
        return params


    def _generate(self, c: int) -> tuple[torch.Tensor, ...]:
        targets = self._components[c][0]
        return tuple(superlora_component_delta(self.plan, targets, self._component_params(c)))


    def _backward_pass_cache(self, task: int) -> dict[tuple[int, bool], Any]:
        with _BACKWARD_LOCK:
            cache = self._backward_cache.get(task)
            if cache is None:
                cache = self._backward_cache[task] = {}

                def release(task: int = task) -> None:  # when this backward pass ends, not at the next forward
                    with _BACKWARD_LOCK:
                        self._backward_cache.pop(task, None)

                torch.autograd.Variable._execution_engine.queue_callback(release)
            return cache


    def _pass_cache(self) -> dict[Any, Any] | None:
        """The reuse cache of the running model forward (per thread), of the running backward pass
        (activation checkpointing recomputing a block: the parameters cannot change in the middle
        of it), or None outside both (a submodule called on its own generates afresh every call)."""
        cache = self._state.get().cache
        if cache is None:
            task = graph_task_id()
            if task < 0:
                return None
            cache = self._backward_pass_cache(task)
        return cache


    def target_source(self, index: int) -> tuple[Any, list[torch.Tensor]]:
        """``(source, inputs)`` of target ``index`` for :func:`.target_forward.adapted_forward`:
        the target's own slice of its groups when the core generates it alone
        (:meth:`tensoradapt.SuperLoRA.sliceable`), else its slot in the component's pass (one
        whole-group transform per forward, shared by the component's targets)."""
        source = self._slices.get(index)
        if source is None and self.plan.sliceable(index):
            names = tuple(sorted(self.plan.parameter_shapes(self.plan.groups_for([index]))))
            source = self._slices[index] = TargetSlice(self.plan, index, names)
        if source is not None:
            inputs = [self.params[safe_key(n)] for n in source.names]
            refuse_sharded_values(inputs)  # FSDP2: a clear error instead of DTensor's
            return source, inputs
        c, position = self._component_of[index]
        grad = torch.is_grad_enabled()
        cache = self._pass_cache()
        key = (c, "pass", grad)
        versions = self._versions(c)
        hit = None if cache is None else cache.get(key)
        if hit is None or hit[0] != versions:  # parameters changed in place since: a new pass
            params = self._component_params(c)
            values = [params[n] for n in self._group_names[c]]
            state = ComponentPass(self.plan, self._components[c][0], self._group_names[c], values,
                                  transient=cache is None, find_outputs=self._recomputed_outputs)
            handle = component_handle(state, values) if grad else values[0].new_empty(0)
            hit = (versions, state, handle)
            if cache is not None:
                cache[key] = hit
        return ComponentSlot(hit[1], position), [hit[2]]


    def _recomputed_outputs(self, state: ComponentPass) -> list[torch.Tensor] | None:
        """The outputs another pass of ``state``'s component holds in the running backward pass with
        the same parameter versions (activation checkpointing recomputing a block), else None."""
        task = graph_task_id()
        if task < 0:
            return None
        with _BACKWARD_LOCK:
            cache = self._backward_cache.get(task)
            entries = [] if cache is None else [e for e in cache.values() if isinstance(e[1], ComponentPass)]
        for _, other, _ in entries:
            if (other is not state and other.targets == state.targets and other.versions == state.versions
                    and other.outputs is not None):
                return other.outputs
        return None


    def target_delta(self, index: int) -> torch.Tensor:
        """``ΔW`` of target ``index`` as a differentiable tensor, generated once per model forward
        (per thread) for the target's whole component (and reused within it).  Used where the
        update must exist as a tensor: several adapters on one layer, and under ``torch.compile``
        (one custom operator per component); the eager single-adapter forward regenerates ``ΔW`` in
        its backward instead (:meth:`target_source`)."""
        c, position = self._component_of[index]
        cache = self._pass_cache()
        if cache is None:
            return self._generate(c)[position]
        key = (c, torch.is_grad_enabled())  # never hand a graph-less ΔW to a layer that needs grads
        # Under torch.compile the version counters are data the graph cannot guard on (a graph break
        # per target); nothing in a traced forward modifies the parameters in place, so none is read.
        versions = () if torch.compiler.is_compiling() else self._versions(c)
        hit = cache.get(key)
        if hit is None or hit[0] != versions:  # parameters changed in place since: regenerate
            hit = cache[key] = (versions, self._generate(c))
        return hit[1][position]


    def _versions(self, c: int) -> tuple[int, ...]:
        return tuple(self.params[safe_key(name)]._version for name in self._group_names[c])


    def reset_cache(self) -> None:
        """Forget every cached ``ΔW``.  Never needed in normal use: the cache lives for one model
        forward (or one backward pass) and entries are regenerated when a parameter changed."""
        self._state.clear()
        with _BACKWARD_LOCK:
            self._backward_cache.clear()

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """``{target name: ΔW}`` with each ``ΔW`` shaped ``(o, n)`` (Conv1D: ``(out, in)``), detached.

        On a model sharded by FSDP2 this is a collective (call it on every rank): the full tensors
        are gathered first and every rank gets the full ``ΔW``."""
        values = gather_full(dict(self.params.items()))  # the parameters themselves unless sharded
        out: dict[str, torch.Tensor] = {}
        for c, (targets, _) in enumerate(self._components):
            params = {name: values[safe_key(name)] for name in self._group_names[c]}
            for t, delta in zip(targets, superlora_component_delta(self.plan, targets, params), strict=True):
                out[self.target_names[t]] = delta
        return out
