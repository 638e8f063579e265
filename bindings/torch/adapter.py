"""``attach(model, SuperLoRAConfig(...), targets)``: SuperLoRA on a live PyTorch model.

Each targeted module is wrapped by a :class:`SuperLoRALayer` that runs the module's own forward
functionally with the weight ``W + ΔW`` (the module's parameters are never swapped or mutated);
the :class:`SuperLoRAAdapter` (registered on the model as ``model.tensoradapt``) owns every
trainable tensor.  A layer takes one of the paths of docs/math.md §6
(:meth:`SuperLoRAAdapter.target_path`): LoRA-shaped targets add ``s (x V) Uᵀ``; weight-shaped
Kronecker/Hadamard products apply their factors to ``x`` (:mod:`.bypass`); every other target
generates its ``ΔW`` inside its forward and again inside its backward (:mod:`.target_forward`),
from its own slice of its group or, under a projection, from its component's pass (computed once
per model forward, per thread, released when the forward ends), so no step holds the ``ΔW`` of
every target — except where that model-wide ``ΔW`` is small (:attr:`SuperLoRAAdapter.keeps_delta`)
or under ``torch.compile``: then it is generated once per forward and added to ``W``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig, buffers
from tensoradapt._validate import check_int
from tensoradapt._version import __version__
from tensoradapt.superlora.plan import param_name

from ._io import FORMAT, FORMAT_VERSION, AdapterFileError
from ._shared import (
    ADAPTER_ATTRIBUTE,
    BaseAdapter,
    ReadsThrough,
    ThreadState,
    accept_base_keys,
    base_forward,
    check_targets,
    forward_kind,
    gather_full,
    graph_task_id,
    refuse_sharded_values,
    report_base_keys,
)
from ._targets import TargetSpec, WeightView, match_targets, weight_view
from .bypass import BypassForm, apply_bypass, bypass_form
from .functional import component_key, superlora_component_delta
from .memory import StepMemory, lora_step_memory, step_memory
from .target_forward import (
    ComponentPass,
    ComponentSlot,
    TargetSlice,
    adapted_forward,
    add_update,
    component_handle,
)

__all__ = ["ADAPTER_ATTRIBUTE", "AdaptedLayer", "Adapter", "SuperLoRAAdapter", "SuperLoRALayer",
           "attach_superlora", "check_targets", "load_superlora"]


#: Default :attr:`SuperLoRAAdapter.keep_delta_bytes`: a model-wide ΔW up to this size is generated once
#: per forward and kept for the backward (fastest); a larger one is never formed (docs/math.md §6.5).
KEEP_DELTA_BYTES = 64 << 20

_BACKWARD_LOCK = threading.Lock()  # guards every adapter's backward-pass ΔW caches (short critical sections)


def _safe_key(name: str) -> str:
    return name.replace(".", "__")


class _ForwardState:
    """One thread's forward-scoped ΔW reuse: nesting depth and ``{(component, grad): (versions, ΔW)}``."""

    def __init__(self) -> None:
        self.depth = 0
        self.cache: dict[tuple[int, bool], Any] | None = None


class SuperLoRALayer(ReadsThrough, nn.Module):
    """A targeted module with its SuperLoRA adapter: ``forward`` runs the module's own forward
    (functionally, with its own settings) with ``W + ΔW``.

    ``base_layer`` is the original module (its parameters untouched).  While the adapter is
    merged or disabled, the base layer runs as is.
    """

    _owner: SuperLoRAAdapter

    def __init__(self, base_layer: nn.Module, index: int, view: WeightView, kind: str,
                 owner: SuperLoRAAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.view = view
        self.kind = kind
        object.__setattr__(self, "_owner", owner)  # not a submodule: the adapter is registered once, on the model
        # every adapter adding its update here: [(adapter, its target index)], the first one is _owner
        object.__setattr__(self, "_contributions", [(owner, index)])
        self.register_state_dict_post_hook(_report_original_weight)
        self.register_state_dict_post_hook(report_base_keys)  # after the one above: plain model keys
        self.register_load_state_dict_pre_hook(accept_base_keys)

    @property
    def contributions(self) -> list[tuple[SuperLoRAAdapter, int]]:
        """``[(adapter, its target index)]`` of every adapter adding its update to this layer."""
        return list(self._contributions)

    def join(self, owner: SuperLoRAAdapter, index: int) -> None:
        """Add ``owner``'s update (its target ``index``) to this layer (a named adapter on a shared target)."""
        self._contributions.append((owner, index))

    def release(self, owner: SuperLoRAAdapter) -> bool:
        """Drop ``owner``'s update; True when other adapters still use this wrapper."""
        rest = [(o, i) for o, i in self._contributions if o is not owner]
        object.__setattr__(self, "_contributions", rest)
        if rest:
            object.__setattr__(self, "_owner", rest[0][0])
            self.index = rest[0][1]
        return bool(rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self._contributions) > 1:
            return self._forward_shared(x)
        return self._forward_one(self._owner, self.index, x)

    def _forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """Several adapters on this layer: the active ones' updates add (``W + ΔW_a + ΔW_b``)."""
        active = [(o, i) for o, i in self._contributions if o.active]
        if len(active) <= 1:
            return self.base_layer(x) if not active else self._forward_one(active[0][0], active[0][1], x)
        base = self.base_layer
        factored = [(o, i) for o, i in active if i in o.factored_targets or i in o.bypass_targets]
        dense = [(o, i) for o, i in active if i not in o.factored_targets and i not in o.bypass_targets]
        if self.kind == "quantized":
            out = base(x)
            for o, i in dense:
                delta = o.target_delta(i).to(out.device)
                out = out + F.linear(x.to(delta.dtype), delta).to(out.dtype)
        elif dense:
            weight = base.weight
            total: torch.Tensor | None = None
            for o, i in dense:
                delta = self.view.update_to_weight(o.target_delta(i)).to(weight.device)
                total = delta if total is None else total + delta.to(total.dtype)
            assert total is not None
            out = base_forward(base, self.kind, x, add_update(weight, total), getattr(base, "bias", None))
        else:
            out = base(x)
        for o, i in factored:
            update = o.low_rank_update if i in o.factored_targets else o.bypass_update
            out = out + update(i, x.to(out.device)).to(out.dtype)
        return out

    def _forward_one(self, owner: SuperLoRAAdapter, index: int, x: torch.Tensor) -> torch.Tensor:
        if not owner.active:
            return self.base_layer(x)
        if index in owner.factored_targets:
            out = self.base_layer(x)
            return out + owner.low_rank_update(index, x.to(out.device)).to(out.dtype)
        if index in owner.bypass_targets:
            out = self.base_layer(x)
            return out + owner.bypass_update(index, x.to(out.device)).to(out.dtype)
        base = self.base_layer
        if not (torch.compiler.is_compiling() or owner.keeps_delta):  # ΔW made here, again in the backward
            source, inputs = owner.target_source(index)
            if self.kind == "quantized":  # never touch the quantised weight: base(x) + x ΔWᵀ
                out = base(x)
                return out + adapted_forward(self, source, x.to(out.device), None, None, inputs).to(out.dtype)
            return adapted_forward(self, source, x, base.weight, getattr(base, "bias", None), inputs)
        # a small model-wide ΔW (kept for the backward), or torch.compile (the component's ΔW is one
        # custom operator, no graph break): ΔW generated once per forward and added to W
        if self.kind == "quantized":
            out = base(x)
            delta = owner.target_delta(index).to(out.device)
            return out + F.linear(x.to(delta.dtype), delta).to(out.dtype)
        weight = base.weight
        delta = self.view.update_to_weight(owner.target_delta(index)).to(weight.device)  # no-op on one device
        return base_forward(base, self.kind, x, add_update(weight, delta), getattr(base, "bias", None))

    def extra_repr(self) -> str:
        return f"target={self.index}, kind={self.view.kind}, delta_shape={self.view.shape}"


def _report_original_weight(module: SuperLoRALayer, state: dict[str, Any], prefix: str, local: Any) -> None:
    """While merged, ``state_dict()`` reports the original base weight (never ``W + ΔW``), so a
    state dict loaded back into an adapted model does not count ``ΔW`` twice."""
    merged = [(o, i) for o, i in module.contributions if o.original_weight(i) is not None]
    merged.sort(key=lambda item: item[0].merge_position)
    original = merged[0][0].original_weight(merged[0][1]) if merged else None  # the weight before any merge
    key = f"{prefix}base_layer.weight"
    if original is not None and key in state:
        state[key] = original.detach()


class SuperLoRAAdapter(BaseAdapter):
    """SuperLoRA attached to a model (made by :func:`tensoradapt.torch.attach`).

    Attributes
    ----------
    plan : tensoradapt.SuperLoRA
        The generator over the targets' ``(o, n)`` shapes.
    target_names : tuple of str
        Module names of the targets, in ``named_modules()`` order.
    params : nn.ParameterDict
        The trainable arrays (keys are the generator's names with ``.`` → ``__``).
    factored_targets : dict of int -> (str, str, float)
        The targets computed as ``base(x) + s (x V) Uᵀ`` without forming ``ΔW`` (see
        :meth:`low_rank_update`): ``{index: (U name, V name, s)}``.
    bypass_targets : dict of int -> BypassForm
        The targets whose update is a weight-shaped Kronecker (LoKr, KronA, LoNKr on a square
        weight) or Hadamard (LoHa) product, computed as ``base(x) + x ΔWᵀ`` factor by factor
        without forming ``ΔW`` (:mod:`.bypass`, docs/math.md §6.2, §6.3).

    Constructing one builds the tensors; ``attach`` and ``load`` then install the wrappers.
    ``values`` (a ``{generator name: tensor}`` dict of the plan's shapes) replaces the initial
    parameters.
    """

    merge_writes_base = True

    method = "superlora"

    def __init__(self, model: nn.Module, config: SuperLoRAConfig, found: list[tuple[str, nn.Module]], *,
                 freeze_base: bool, seed: int | None, dtype: torch.dtype | None,
                 values: dict[str, torch.Tensor] | None = None, generator: str | None = None) -> None:
        super().__init__()
        kinds = [forward_kind(name, module) for name, module in found]
        views = [weight_view(name, module) for name, module in found]
        names = [name for name, _ in found]
        self.plan = SuperLoRA(config, [v.shape for v in views], names, generator=generator)
        #: the fixed-buffer generator of the projections (``buffers.GENERATORS``), stored in files
        self.generator_id = self.plan.generator_id
        self.config = config
        self.views = tuple(views)
        self.kinds = tuple(kinds)
        self.seed = config.seed if seed is None else int(seed)
        first = found[0][1].weight
        if dtype is None:
            dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        initial = self.plan.init(self.seed, xp=torch, dtype=dtype, device=first.device)
        self.params = nn.ParameterDict({_safe_key(k): nn.Parameter(v) for k, v in initial.items()})
        self._components = self.plan.components()
        self._component_of = {}
        for c, (targets, _) in enumerate(self._components):
            for position, t in enumerate(targets):
                self._component_of[t] = (c, position)
        self._group_names = [
            tuple(sorted(self.plan.parameter_shapes(groups))) for _, groups in self._components
        ]
        self._register_components()
        self._setup_lifecycle(model, found, freeze_base)
        self.factored_targets = {
            i: f for i, f in ((i, self._factored_form(i, m)) for i, (_, m) in enumerate(found)) if f
        }
        self.bypass_targets = {
            i: f for i, f in ((i, self._bypass_form(i, m)) for i, (_, m) in enumerate(found)) if f
        }
        # entries of the ΔW the layers without a factored or bypass form would keep (keeps_delta)
        self._delta_entries = sum(math.prod(shape) for i, shape in enumerate(self.plan.shapes)
                                  if i not in self.factored_targets and i not in self.bypass_targets)
        self._merged_weights: list[torch.Tensor] | None = None
        self._slices: dict[int, TargetSlice] = {}  # the sliceable targets' sources, made on first use
        #: largest model-wide ΔW kept from the forward for the backward (:attr:`keeps_delta`); 0: never
        self.keep_delta_bytes = KEEP_DELTA_BYTES
        self._state = ThreadState(_ForwardState)
        # ΔW recomputed inside backward passes (activation checkpointing): {graph task id: cache}
        self._backward_cache: dict[int, dict[tuple[int, bool], Any]] = {}
        if values is not None:
            with torch.no_grad():
                for name, value in values.items():
                    self.params[_safe_key(name)].copy_(value)

    def _register_components(self) -> None:
        """Make every component a ``torch.compile`` operator now (outside any trace, see
        :func:`.functional.superlora_component_delta`)."""
        for (targets, _), names in zip(self._components, self._group_names, strict=True):
            component_key(self.plan, tuple(targets), names)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_components()  # a copy or an unpickled adapter: its plan is a new object

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The identity on its first argument.

        The adapter is registered on the model so that ``model.parameters()``, ``.to()``,
        ``state_dict()`` and DistributedDataParallel see its tensors; its computation happens in
        the :class:`SuperLoRALayer` wrappers.  Containers that call every child in turn
        (``nn.Sequential``) therefore pass through it unchanged.
        """
        return args[0] if args else None

    def _factored_form(self, index: int, module: nn.Module) -> tuple[str, str, float] | None:
        """``(U name, V name, s)`` when target ``index`` is a plain low-rank product
        ``ΔW = s U Vᵀ`` of its own ``(o, n)`` shape (the LoRA preset: one weight per group, an
        identity-core matrix split, nothing cut, no projection), else None.

        Such a layer computes ``base(x) + s (x V) Uᵀ`` and never forms ``ΔW`` (like PEFT's LoRA):
        cheaper than ``x (W + ΔW)ᵀ`` in time, as the backward needs no ``(o, n)`` weight gradient.
        """
        cfg = self.plan.config
        view = self.views[index]
        c, _ = self._component_of[index]
        targets, groups = self._components[c]
        if (len(targets), len(groups)) != (1, 1) or cfg.projection != "none" or cfg.layout != "fold":
            return None
        if not self._takes_activation_path(index, module):
            return None
        group = self.plan.groups[groups[0]]
        if len(group.splits) != 1 or group.n != group.size or group.padding:
            return None
        split = group.splits[0]
        if split.kind != "identity" or split.shape != view.shape or split.fixed_modes:
            return None
        return param_name(group.index, 1, "factor0"), param_name(group.index, 1, "factor1"), float(group.scale)

    def _takes_activation_path(self, index: int, module: nn.Module) -> bool:
        """Whether target ``index`` can add its update as ``base(x) + x ΔWᵀ`` (``nn.Linear``,
        ``Conv1D`` or a quantised linear layer)."""
        view = self.views[index]
        return (view.kind == "conv1d" or (view.kind == "linear" and type(module) is nn.Linear)
                or self.kinds[index] == "quantized")

    def _bypass_form(self, index: int, module: nn.Module) -> BypassForm | None:
        """The target's Kronecker/Hadamard product applied to activations (:mod:`.bypass`), or None."""
        if index in self.factored_targets or not self._takes_activation_path(index, module):
            return None
        return bypass_form(self.plan, index, self.views[index].shape)

    def bypass_update(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` of a target in :attr:`bypass_targets`, without forming ``ΔW``."""
        form = self.bypass_targets[index]
        names = [name for _, _, blocks in form.splits for _, name in blocks]
        refuse_sharded_values([self.params[_safe_key(n)] for n in names])  # FSDP2: a clear error
        return apply_bypass(form, lambda name: self.params[_safe_key(name)], x)

    def low_rank_update(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``s (x V) Uᵀ``, the adapter's part of the output of a target in :attr:`factored_targets`."""
        u_name, v_name, scale = self.factored_targets[index]
        U, V = self.params[_safe_key(u_name)], self.params[_safe_key(v_name)]
        refuse_sharded_values((U, V))  # FSDP2: a clear error instead of DTensor's
        dtype = x.dtype if x.is_floating_point() else U.dtype
        hidden = F.linear(x.to(dtype), V.t().to(dtype))
        return F.linear(hidden, (U * scale if scale != 1.0 else U).to(dtype))

    # ------------------------------------------------------------------ installation
    def _make_wrapper(self, index: int, module: nn.Module) -> nn.Module:
        return SuperLoRALayer(module, index, self.views[index], self.kinds[index], self)

    def _can_share(self, wrapper: nn.Module) -> bool:
        return isinstance(wrapper, SuperLoRALayer)

    def install(self, *args: Any, **kwargs: Any) -> None:
        super().install(*args, **kwargs)
        self._hooks = [
            self._model.register_forward_pre_hook(self._begin_forward),
            self._model.register_forward_hook(self._end_forward, always_call=True),
        ]

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
    def _component_params(self, c: int) -> dict[str, torch.Tensor]:
        params = {name: self.params[_safe_key(name)] for name in self._group_names[c]}
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
            inputs = [self.params[_safe_key(n)] for n in source.names]
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
        return tuple(self.params[_safe_key(name)]._version for name in self._group_names[c])

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
            params = {name: values[_safe_key(name)] for name in self._group_names[c]}
            for t, delta in zip(targets, superlora_component_delta(self.plan, targets, params), strict=True):
                out[self.target_names[t]] = delta
        return out

    # ------------------------------------------------------------------ parameters and reporting
    def _adapter_parameters(self) -> Any:
        for key, value in self.params.items():
            yield key.replace("__", "."), value

    @property
    def num_params(self) -> int:
        """Number of trainable adapter entries (equals ``tensoradapt.count_params`` for the same
        shapes; ``modules_to_save`` not included)."""
        return self.plan.num_params

    def target_path(self, index: int) -> str:
        """How target ``index`` runs in a train step (docs/math.md §6): ``"factored"`` (LoRA-shaped),
        ``"bypass"`` (a Kronecker/Hadamard product on activations), ``"sliced"`` (its own slice,
        regenerated in the backward), ``"projected"`` (its component's shared pass) or
        ``"materialised"`` (``ΔW`` generated once per forward and added to ``W``: a small model-wide
        ``ΔW``, see :attr:`keeps_delta`, or a layer shared with other named adapters)."""
        index = check_int("index", index, minimum=0)
        if index >= len(self.target_names):
            raise ValueError(f"index must be a target index below {len(self.target_names)}, got {index}")
        wrapper = self._wrappers[index] if index < len(self._wrappers) else None
        if len(getattr(wrapper, "contributions", ())) > 1 and index not in self.factored_targets | self.bypass_targets:
            return "materialised"  # a layer several adapters update adds their ΔW to W as tensors
        if index in self.factored_targets:
            return "factored"
        if index in self.bypass_targets:
            return "bypass"
        if self.keeps_delta:
            return "materialised"
        return "sliced" if self.plan.sliceable(index) else "projected"

    @property
    def keeps_delta(self) -> bool:
        """Whether the layers without a factored or bypass form keep their ``ΔW`` from the forward for
        the backward (docs/math.md §6.5): True while the model-wide ``ΔW`` of those layers, in the
        parameters' dtype, is at most :attr:`keep_delta_bytes` (default 64 MiB).  Generating once
        per forward is then the fastest path and costs little; above it each layer regenerates its
        own ``ΔW`` in its backward and no step holds the model-wide ``ΔW``."""
        return self._delta_entries * next(iter(self.params.values())).element_size() <= self.keep_delta_bytes

    def step_memory(self, tokens: int = 0) -> StepMemory:
        """The predicted extra memory of one AdamW train step (:mod:`.memory`): trainable tensors
        with gradients and moments, activations the adapter saves for ``tokens`` tokens, and the
        largest working set.  Shapes only, so it works on a model built on the ``meta`` device."""
        tokens = check_int("tokens", tokens, minimum=0)
        dtypes = [getattr(m, "weight", None) for m in self._originals]
        dtypes = [w.dtype if isinstance(w, torch.Tensor) else torch.float32 for w in dtypes]
        paths = [self.target_path(i) for i in range(len(self.target_names))]
        return step_memory(self.plan, paths, dtypes, next(iter(self.params.values())).dtype, self._components,
                           tokens=tokens)

    def summary(self) -> str:
        """A table: trainable vs all parameters (like PEFT's ``print_trainable_parameters``),
        the targets with their ``(o, n)`` shapes, and the generator's per-group shapes."""
        state = "merged" if self.merged else "disabled" if self._disabled else "active"
        lines = [
            self._trainable_line(),
            f"adapter params: {self.num_params:,} in {len(self.params)} tensors, {len(self.target_names)} targets, "
            f"state={state}, generator={self.generator_id.split(' ')[0]}"
            + (f", modules_to_save={list(self.modules_to_save)}" if self.modules_to_save else ""),
            f"{'#':>4} {'target':<40} {'kind':<7} {'delta (o, n)':<14}",
        ]
        for i, (name, view) in enumerate(zip(self.target_names, self.views, strict=True)):
            lines.append(f"{i:>4} {name:<40} {view.kind:<7} {f'{view.shape[0]}x{view.shape[1]}':<14}")
        lines.append(self.plan.describe())
        ours = self.step_memory()
        peft = lora_step_memory(self.plan.shapes, 8, param_bytes=next(iter(self.params.values())).element_size())
        lines.append(f"predicted extra memory of an AdamW step (beyond the frozen model and its activations): {ours}; "
                     f"PEFT LoRA r=8 on these targets: {peft}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ merge / unmerge / detach
    def original_weight(self, index: int) -> torch.Tensor | None:
        """The weight target ``index`` had before :meth:`merge` (``None`` when not merged)."""
        return None if self._merged_weights is None else self._merged_weights[index]

    @torch.no_grad()
    def _apply_merge(self) -> None:
        quantized = [n for n, k in zip(self.target_names, self.kinds, strict=True) if k == "quantized"]
        if quantized:
            raise RuntimeError(
                f"cannot merge into quantised target {quantized[0]!r}"
                ": W + ΔW does not fit its quantised weight without re-quantising it; keep the adapter unmerged "
                "(base(x) + x ΔWᵀ costs little), or save it and load it onto the unquantised model to merge there. "
                "The model was not changed"
            )
        deltas = []
        for c, (targets, _) in enumerate(self._components):
            deltas.extend(zip(targets, self._generate(c), strict=True))
        deltas.sort(key=lambda item: item[0])

        def merged_weight(t: int, delta: torch.Tensor) -> torch.Tensor:
            weight = self._originals[t].weight
            return add_update(weight, self.views[t].update_to_weight(delta).to(weight.device))

        merged = {}
        for t, delta in deltas:  # check everything before writing anything
            if not bool(torch.isfinite(delta).all()):
                raise FloatingPointError(
                    f"ΔW of target {self.target_names[t]!r} has non-finite entries; the model was not changed"
                )
            value = merged_weight(t, delta)
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(
                    f"W + ΔW of target {self.target_names[t]!r} overflows its dtype "
                    f"({self._originals[t].weight.dtype}); the model was not changed"
                )
            merged[t] = value
        originals = [module.weight.detach().clone() for module in self._originals]
        try:
            for t, value in merged.items():
                self._originals[t].weight.copy_(value)
        except BaseException:
            for module, original in zip(self._originals, originals, strict=True):
                module.weight.copy_(original)
            raise
        self._merged_weights = originals

    @torch.no_grad()
    def _apply_unmerge(self) -> None:
        assert self._merged_weights is not None
        for module, original in zip(self._originals, self._merged_weights, strict=True):
            module.weight.copy_(original)
        self._merged_weights = None

    def _plain_modules(self) -> list[nn.Module]:
        self._merged_weights = None  # the merged weights stay
        return list(self._originals)

    def _uninstall(self, modules: Any) -> nn.Module:
        model = super()._uninstall(modules)
        self.reset_cache()
        return model

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata an adapter file carries."""
        dtype = next(iter(self.params.values())).dtype
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "method": "superlora",
            "config": self.config.to_dict(),
            "targets": [
                {"name": n, "kind": v.kind, "shape": list(v.shape), "weight_shape": list(v.weight_shape)}
                for n, v in zip(self.target_names, self.views, strict=True)
            ],
            "parameters": {name: list(p.shape) for name, p in self._adapter_parameters()},
            "param_dtype": str(dtype).removeprefix("torch."),
            "seed": self.seed,
            "generator_id": self.generator_id,
            "modules_to_save": self._saved_metadata(),
        }


Adapter = SuperLoRAAdapter  # the 0.x name
AdaptedLayer = SuperLoRALayer  # the 0.x name


def attach_superlora(model: nn.Module, config: SuperLoRAConfig, targets: TargetSpec, *, freeze_base: bool = True,
                     seed: int | None = None, dtype: torch.dtype | None = None,
                     modules_to_save: Any = (), name: str = "default",
                     generator: str | None = None) -> SuperLoRAAdapter:
    """Attach SuperLoRA to ``model`` (see :func:`tensoradapt.torch.attach`); ``generator`` is one of
    ``tensoradapt.buffers.GENERATORS`` (default ``buffers.GENERATOR_ID``), checked before anything else."""
    generator = buffers.check_generator(generator)
    if not isinstance(config, SuperLoRAConfig):
        raise TypeError(f"config must be a SuperLoRAConfig, got {type(config).__name__}")
    found = check_targets(model, match_targets(model, targets) if not isinstance(targets, list)
                          or not targets or not isinstance(targets[0], tuple) else targets)
    adapter = SuperLoRAAdapter(model, config, found, freeze_base=freeze_base, seed=seed, dtype=dtype,
                               generator=generator)
    adapter.install(modules_to_save, name=name)
    return adapter


def load_superlora(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *,
                   path: str, freeze_base: bool = True) -> SuperLoRAAdapter:
    """Rebuild a saved SuperLoRA adapter on ``model`` from a checked file (see ``_io.check_file``):
    the model's targets are checked against the file first, the config's plan against the stored
    tensors before anything sized by the config is allocated."""
    from ._io import check_model_targets

    config = metadata["config"]
    names = [r["name"] for r in metadata["targets"]]
    found = check_model_targets(model, metadata, path)
    for name, module in found:
        try:
            forward_kind(name, module)
        except TypeError as error:
            raise AdapterFileError(f"{path}: {error}") from None
    mismatched = []
    for (name, module), record in zip(found, metadata["targets"], strict=True):
        view = weight_view(name, module)
        shape, kind, weight_shape = tuple(record["shape"]), record["kind"], tuple(record["weight_shape"])
        if (view.shape, view.kind, view.weight_shape) != (shape, kind, weight_shape):
            mismatched.append(f"{name}: file {kind} {shape} (weight {weight_shape}) vs model {view.kind} "
                              f"{view.shape} (weight {view.weight_shape})")
    if mismatched:
        raise AdapterFileError(f"{path} does not fit this model, target shapes differ: " + "; ".join(mismatched[:5]))
    try:
        plan = SuperLoRA(config, [tuple(r["shape"]) for r in metadata["targets"]], names,
                         generator=metadata["generator_id"])
        expected = plan.parameter_shapes()
    except (ValueError, TypeError, OverflowError) as error:
        raise AdapterFileError(f"{path}: its config does not fit the targets ({error})") from None
    adapter_tensors = {k: v for k, v in tensors.items() if k in metadata["parameters"]}
    if set(expected) != set(adapter_tensors) or any(
            list(adapter_tensors[k].shape) != list(s) for k, s in expected.items()):
        raise AdapterFileError(f"{path}: the stored parameters do not match the plan their config makes")
    dtype = getattr(torch, metadata["param_dtype"])
    return SuperLoRAAdapter(model, config, found, freeze_base=freeze_base, seed=metadata["seed"], dtype=dtype,
                            values=adapter_tensors, generator=metadata["generator_id"])  # installed by the caller
