"""``attach(model, SuperLoRAConfig(...), targets)``: SuperLoRA on a live PyTorch model.

Each targeted module is wrapped by a :class:`~.layer.SuperLoRALayer` that runs the module's own
forward functionally with the weight ``W + ΔW`` (the module's parameters are never swapped or
mutated); the :class:`SuperLoRAAdapter` (registered on the model as ``model.tensoradapt``) owns every
trainable tensor.  A layer takes one of the paths of docs/math.md §6
(:meth:`SuperLoRAAdapter.target_path`): LoRA-shaped targets add ``s (x V) Uᵀ``; weight-shaped
Kronecker/Hadamard products apply their factors to ``x`` (:mod:`tensoradapt.torch.bypass`); every
other target generates its ``ΔW`` inside its forward and again inside its backward
(:mod:`tensoradapt.torch.target_forward`), from its own slice of its group or, under a projection,
from its component's pass (computed once per model forward, per thread, released when the forward
ends; :mod:`.passes`), so no step holds the ``ΔW`` of every target — except where that model-wide
``ΔW`` is small (:attr:`SuperLoRAAdapter.keeps_delta`) or under ``torch.compile``: then it is
generated once per forward and added to ``W``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig
from tensoradapt._validate import check_int
from tensoradapt._version import __version__
from tensoradapt.superlora.forms import exact_form

from ..bypass import BypassForm, apply_bypass, bypass_form
from ..distributed import refuse_sharded_values
from ..files.layout import FORMAT, FORMAT_VERSION
from ..functional import component_key
from ..lifecycle import BaseAdapter
from ..memory import StepMemory, lora_step_memory, step_memory
from ..modules import ThreadState, forward_kind, weight_view
from ..target_forward import TargetSlice, add_update
from .layer import SuperLoRALayer
from .passes import DeltaPasses, ForwardState, safe_key

__all__ = ["KEEP_DELTA_BYTES", "Adapter", "SuperLoRAAdapter"]


#: Default :attr:`SuperLoRAAdapter.keep_delta_bytes`: a model-wide ΔW up to this size is generated once
#: per forward and kept for the backward (fastest); a larger one is never formed (docs/math.md §6.5).
KEEP_DELTA_BYTES = 64 << 20


class SuperLoRAAdapter(DeltaPasses, BaseAdapter):
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
        self.params = nn.ParameterDict({safe_key(k): nn.Parameter(v) for k, v in initial.items()})
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
        self._state = ThreadState(ForwardState)
        # ΔW recomputed inside backward passes (activation checkpointing): {graph task id: cache}
        self._backward_cache: dict[int, dict[tuple[int, bool], Any]] = {}
        if values is not None:
            with torch.no_grad():
                for name, value in values.items():
                    self.params[safe_key(name)].copy_(value)

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
        identity-core matrix split, nothing cut, no projection; the core's decision,
        :func:`tensoradapt.superlora.forms.exact_form`) on a layer that takes the activation path,
        else None.

        Such a layer computes ``base(x) + s (x V) Uᵀ`` and never forms ``ΔW`` (like PEFT's LoRA):
        cheaper than ``x (W + ΔW)ᵀ`` in time, as the backward needs no ``(o, n)`` weight gradient.
        """
        form = exact_form(self.plan, index)
        names = form.factored if form.kind is not None else None  # NotExact has no factored pair
        if names is None or not self._takes_activation_path(index, module):
            return None
        return (*names, form.scale)

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
        refuse_sharded_values([self.params[safe_key(n)] for n in names])  # FSDP2: a clear error
        return apply_bypass(form, lambda name: self.params[safe_key(name)], x)

    def low_rank_update(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``s (x V) Uᵀ``, the adapter's part of the output of a target in :attr:`factored_targets`."""
        u_name, v_name, scale = self.factored_targets[index]
        U, V = self.params[safe_key(u_name)], self.params[safe_key(v_name)]
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
