"""``attach(model, SuperLoRAConfig(...), targets)``: SuperLoRA on a live PyTorch model.

Each targeted module is wrapped by an :class:`AdaptedLayer` that calls the original module with
the weight ``W + ΔW``; the :class:`Adapter` (registered on the model as ``model.tensoradapt``)
owns every trainable tensor and generates ``ΔW`` one component of the generator at a time
(:meth:`tensoradapt.SuperLoRA.components`), **once per model forward**: the first layer that needs
a component triggers it and later layers reuse the result until the forward ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensoradapt import SuperLoRA, SuperLoRAConfig, buffers
from tensoradapt._version import __version__
from tensoradapt.superlora.plan import param_name

from ._io import FORMAT, FORMAT_VERSION, AdapterFileError, write_adapter
from ._shared import ADAPTER_ATTRIBUTE, ReadsThrough, Switchable, graph_task_id
from ._targets import TargetSpec, WeightView, match_targets, weight_view
from .functional import superlora_component_delta

__all__ = ["ADAPTER_ATTRIBUTE", "AdaptedLayer", "Adapter", "attach_superlora", "load_superlora"]


def _safe_key(name: str) -> str:
    return name.replace(".", "__")


class AdaptedLayer(ReadsThrough, nn.Module):
    """A targeted module with its adapter: ``forward`` runs the original module with ``W + ΔW``.

    ``base_layer`` is the original module (its parameters untouched).  While the adapter is
    merged or disabled, the base layer runs as is.
    """

    def __init__(self, base_layer: nn.Module, index: int, view: WeightView, owner: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.view = view
        object.__setattr__(self, "_owner", owner)  # not a submodule: the adapter is registered once, on the model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner: Adapter = self._owner
        if not owner.active:
            return self.base_layer(*args, **kwargs)
        if self.index in owner.factored_targets and len(args) == 1 and not kwargs:
            out = self.base_layer(args[0])
            return out + owner.low_rank_update(self.index, args[0].to(out.device)).to(out.dtype)
        weight = self.base_layer.weight
        delta = self.view.to_weight(owner.target_delta(self.index)).to(weight.device)  # no-op on one device
        if weight.dtype == delta.dtype:
            effective = weight + delta
        else:  # half-precision weights: add in fp32, round once
            effective = (weight.to(delta.dtype) + delta).to(weight.dtype)
        kind, base = self.view.kind, self.base_layer
        if kind == "linear" and type(base) is nn.Linear and len(args) == 1 and not kwargs:
            return F.linear(args[0], effective, base.bias)
        if kind == "conv1d" and len(args) == 1 and not kwargs:
            x = args[0]
            out = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), effective)
            return out.reshape(*x.shape[:-1], effective.shape[1])
        return torch.func.functional_call(base, {"weight": effective}, args, kwargs)

    def extra_repr(self) -> str:
        return f"target={self.index}, kind={self.view.kind}, delta_shape={self.view.shape}"


class Adapter(Switchable, nn.Module):
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

    Constructing one puts the wrappers in place (``attach`` and ``load`` do it); ``values`` (a
    ``{generator name: tensor}`` dict of the plan's shapes) replaces the initial parameters first.
    """

    def __init__(self, model: nn.Module, config: SuperLoRAConfig, found: list[tuple[str, nn.Module]], *,
                 freeze_base: bool, seed: int | None, dtype: torch.dtype | None,
                 values: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        views = [weight_view(name, module) for name, module in found]
        names = [name for name, _ in found]
        self.plan = SuperLoRA(config, [v.shape for v in views], names)
        self.config = config
        self.target_names = tuple(names)
        self.views = tuple(views)
        self.seed = config.seed if seed is None else int(seed)
        first = found[0][1].weight
        if dtype is None:
            dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        if not dtype.is_floating_point:
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
        self.factored_targets = {
            i: f for i, f in ((i, self._factored_form(i, m)) for i, (_, m) in enumerate(found)) if f
        }
        object.__setattr__(self, "_model", model)
        self._originals = [module for _, module in found]
        self._wrappers: list[AdaptedLayer] = []
        self._merged_weights: list[torch.Tensor] | None = None
        self._disabled = 0
        # ΔW reuse: {(component, grad enabled): (parameter versions, ΔW of the component's targets)}
        self._cache: dict[tuple[int, bool], Any] | None = None
        self._backward_cache: tuple[int, dict[tuple[int, bool], Any]] = (-1, {})
        self._depth = 0
        self._requires_grad: dict[str, bool] = {}
        self._hooks: list[Any] = []
        self._attached = False
        self._freeze_base = freeze_base
        if values is not None:
            with torch.no_grad():
                for name, value in values.items():
                    self.params[_safe_key(name)].copy_(value)
        self._install()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The identity on its first argument.

        The adapter is registered on the model so that ``model.parameters()``, ``.to()``,
        ``state_dict()`` and DistributedDataParallel see its tensors; its computation happens in
        the :class:`AdaptedLayer` wrappers.  Containers that call every child in turn
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
        if not (view.kind == "conv1d" or (view.kind == "linear" and type(module) is nn.Linear)):
            return None
        group = self.plan.groups[groups[0]]
        if len(group.splits) != 1 or group.n != group.size or group.padding:
            return None
        split = group.splits[0]
        if split.kind != "identity" or split.shape != view.shape or split.fixed_modes:
            return None
        return param_name(group.index, 1, "factor0"), param_name(group.index, 1, "factor1"), float(group.scale)

    def low_rank_update(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``s (x V) Uᵀ``, the adapter's part of the output of a target in :attr:`factored_targets`."""
        u_name, v_name, scale = self.factored_targets[index]
        U, V = self.params[_safe_key(u_name)], self.params[_safe_key(v_name)]
        dtype = x.dtype if x.is_floating_point() else U.dtype
        hidden = F.linear(x.to(dtype), V.t().to(dtype))
        return F.linear(hidden, (U * scale if scale != 1.0 else U).to(dtype))

    # ------------------------------------------------------------------ installation
    def _install(self) -> None:
        for name, module in zip(self.target_names, self._originals, strict=True):
            if isinstance(module, AdaptedLayer):
                raise RuntimeError(f"target {name!r} is already adapted; detach the other adapter first")
        self._wrap_targets(lambda i, module: AdaptedLayer(module, i, self.views[i], self))
        self._hooks = [
            self._model.register_forward_pre_hook(self._begin_forward),
            self._model.register_forward_hook(self._end_forward, always_call=True),
        ]

    def _begin_forward(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._cache = {}
            self._backward_cache = (-1, {})
        self._depth += 1

    def _end_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._cache = None

    # ------------------------------------------------------------------ ΔW
    @property
    def active(self) -> bool:
        """Whether the adapted layers add ``ΔW`` (not merged, not disabled, attached)."""
        return self._attached and self._merged_weights is None and self._disabled == 0

    def _component_params(self, c: int) -> dict[str, torch.Tensor]:
        return {name: self.params[_safe_key(name)] for name in self._group_names[c]}

    def _generate(self, c: int) -> tuple[torch.Tensor, ...]:
        targets = self._components[c][0]
        return tuple(superlora_component_delta(self.plan, targets, self._component_params(c)))

    def _release_backward_cache(self) -> None:
        self._backward_cache = (-1, {})

    def target_delta(self, index: int) -> torch.Tensor:
        """``ΔW`` of target ``index`` as the adapted layers use it: differentiable, generated once
        per model forward for the target's whole component (and reused within it)."""
        c, position = self._component_of[index]
        cache = self._cache
        if cache is None:
            # Outside a model forward.  During a backward pass (activation checkpointing recomputing
            # a block) reuse within that pass: the parameters cannot change in the middle of it.
            # Otherwise (a submodule called on its own) generate afresh every call.
            task = graph_task_id()
            if task < 0:
                return self._generate(c)[position]
            if self._backward_cache[0] != task:
                self._backward_cache = (task, {})
                # release the recomputed ΔW when this backward pass ends, not at the next forward
                torch.autograd.Variable._execution_engine.queue_callback(self._release_backward_cache)
            cache = self._backward_cache[1]
        key = (c, torch.is_grad_enabled())  # never hand a graph-less ΔW to a layer that needs grads
        versions = self._versions(c)
        hit = cache.get(key)
        if hit is None or hit[0] != versions:  # parameters changed in place since: regenerate
            hit = cache[key] = (versions, self._generate(c))
        return hit[1][position]

    def _versions(self, c: int) -> tuple[int, ...]:
        return tuple(self.params[_safe_key(name)]._version for name in self._group_names[c])

    def reset_cache(self) -> None:
        """Forget every cached ``ΔW``.  Never needed in normal use: the cache lives for one model
        forward (or one backward pass) and entries are regenerated when a parameter changed."""
        self._cache = None
        self._depth = 0
        self._backward_cache = (-1, {})

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """``{target name: ΔW}`` with each ``ΔW`` shaped ``(o, n)`` (Conv1D: ``(out, in)``), detached."""
        out: dict[str, torch.Tensor] = {}
        for c, (targets, _) in enumerate(self._components):
            for t, delta in zip(targets, self._generate(c), strict=True):
                out[self.target_names[t]] = delta
        return out

    # ------------------------------------------------------------------ parameters and reporting
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's trainable tensors (give these to the optimiser)."""
        return list(self.params.values())

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(generator name, parameter)`` pairs, e.g. ``("g0.split1.factor0", …)``."""
        for key, value in self.params.items():
            yield key.replace("__", "."), value

    @property
    def num_params(self) -> int:
        """Number of trainable entries (equals ``tensoradapt.count_params`` for the same shapes)."""
        return self.plan.num_params

    def summary(self) -> str:
        """A table: trainable vs all parameters (like PEFT's ``print_trainable_parameters``),
        the targets with their ``(o, n)`` shapes, and the generator's per-group shapes."""
        model = self._model
        adapter_ids = {id(p) for p in self.params.values()}
        base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = base + self.num_params
        lines = [
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}",
            f"adapter params: {self.num_params:,} in {len(self.params)} tensors, {len(self.target_names)} targets, "
            f"state={'merged' if self._merged_weights is not None else 'disabled' if self._disabled else 'active'}",
            f"{'#':>4} {'target':<40} {'kind':<7} {'delta (o, n)':<14}",
        ]
        for i, (name, view) in enumerate(zip(self.target_names, self.views, strict=True)):
            lines.append(f"{i:>4} {name:<40} {view.kind:<7} {f'{view.shape[0]}x{view.shape[1]}':<14}")
        lines.append(self.plan.describe())
        return "\n".join(lines)

    def print_trainable_parameters(self) -> None:
        """Print the first line of :meth:`summary` (PEFT's format)."""
        print(self.summary().splitlines()[0])

    # ------------------------------------------------------------------ merge / unmerge / detach
    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this adapter was detached from its model")

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``ΔW`` into the targets' weights (inference without overhead).

        The original weights are kept (on their device) so that :meth:`unmerge` and :meth:`detach`
        restore them bit for bit.  Refuses (``RuntimeError``) when already merged and
        (``FloatingPointError``) when any ``ΔW`` has a NaN or infinite entry; in both cases the
        model is left unchanged.
        """
        self._check_attached()
        if self._merged_weights is not None:
            raise RuntimeError("the adapter is already merged; call unmerge() first")
        deltas = []
        for c, (targets, _) in enumerate(self._components):
            deltas.extend(zip(targets, self._generate(c), strict=True))
        deltas.sort(key=lambda item: item[0])

        def merged_weight(t: int, delta: torch.Tensor) -> torch.Tensor:
            weight = self._originals[t].weight
            update = self.views[t].to_weight(delta).to(weight.device)
            return (weight.to(update.dtype) + update).to(weight.dtype)

        for t, delta in deltas:  # check everything before writing anything
            if not bool(torch.isfinite(delta).all()):
                raise FloatingPointError(
                    f"ΔW of target {self.target_names[t]!r} has non-finite entries; the model was not changed"
                )
            if not bool(torch.isfinite(merged_weight(t, delta)).all()):
                raise FloatingPointError(
                    f"W + ΔW of target {self.target_names[t]!r} overflows its dtype "
                    f"({self._originals[t].weight.dtype}); the model was not changed"
                )
        originals = [module.weight.detach().clone() for module in self._originals]
        try:
            for t, delta in deltas:
                self._originals[t].weight.copy_(merged_weight(t, delta))
        except BaseException:
            for module, original in zip(self._originals, originals, strict=True):
                module.weight.copy_(original)
            raise
        self._merged_weights = originals

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weights saved by :meth:`merge` (bit for bit)."""
        self._check_attached()
        if self._merged_weights is None:
            raise RuntimeError("the adapter is not merged")
        for module, original in zip(self._originals, self._merged_weights, strict=True):
            module.weight.copy_(original)
        self._merged_weights = None

    @property
    def merged(self) -> bool:
        return self._merged_weights is not None

    def _uninstall(self) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        model = self._unwrap_targets(self._originals)
        self._wrappers = []
        self._cache = None
        self._backward_cache = (-1, {})
        return model

    def detach(self) -> nn.Module:
        """Remove the adapter: the original modules go back in place with their original weights
        (unmerged first if merged), ``requires_grad`` flags restored; returns the model."""
        self._check_attached()
        if self._merged_weights is not None:
            self.unmerge()
        return self._uninstall()

    def merge_and_detach(self) -> nn.Module:
        """Merge ``ΔW`` into the weights and remove the adapter: a plain model with updated weights."""
        self._check_attached()
        if self._merged_weights is None:
            self.merge()
        self._merged_weights = None
        return self._uninstall()

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
            "parameters": {name: list(p.shape) for name, p in self.named_trainable_parameters()},
            "param_dtype": str(dtype).removeprefix("torch."),
            "seed": self.seed,
            "generator_id": buffers.GENERATOR_ID,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the adapter to ``path`` (``.safetensors``; tensors plus JSON metadata), atomically."""
        return write_adapter(path, dict(self.named_trainable_parameters()), self.metadata())


def check_targets(model: nn.Module, found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Refuse targets a wrapper cannot adapt faithfully (see the messages)."""
    for name, module in found:
        if isinstance(module, AdaptedLayer) or ".base_layer" in f".{name}":
            raise RuntimeError(f"module {name!r} belongs to an attached adapter; detach it first")
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    weights: dict[Any, str] = {}
    for name, module in found:
        names = aliases.get(id(module), [name])
        if len(names) > 1:
            raise ValueError(
                f"target {name!r} is one module reachable under several names {names}: a wrapper on one name "
                "would leave the others unadapted; untie the module or do not target it"
            )
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            key = (weight.device, weight.untyped_storage().data_ptr()) if weight.numel() else id(weight)
            if key in weights:
                raise ValueError(
                    f"targets {weights[key]!r} and {name!r} share one weight tensor (tied weights); "
                    "merging would add both updates to it: target one of them"
                )
            weights[key] = name
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(
                f"target {name!r} belongs to an nn.MultiheadAttention, whose forward reads its weights "
                "directly and would bypass the adapter; target other layers"
            )
    return found


def attach_superlora(model: nn.Module, config: SuperLoRAConfig, targets: TargetSpec, *, freeze_base: bool = True,
                     seed: int | None = None, dtype: torch.dtype | None = None) -> Adapter:
    """Attach SuperLoRA to ``model`` (see :func:`tensoradapt.torch.attach`)."""
    if not isinstance(config, SuperLoRAConfig):
        raise TypeError(f"config must be a SuperLoRAConfig, got {type(config).__name__}")
    found = check_targets(model, match_targets(model, targets))
    return Adapter(model, config, found, freeze_base=freeze_base, seed=seed, dtype=dtype)


def load_superlora(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *,
                   path: str, freeze_base: bool = True) -> Adapter:
    """Rebuild a saved SuperLoRA adapter on ``model`` (checks targets, shapes and dtypes first)."""
    try:
        config = SuperLoRAConfig.from_dict(metadata["config"])
        records = metadata["targets"]
        names = [str(r["name"]) for r in records]
        shapes = [tuple(int(d) for d in r["shape"]) for r in records]
        kinds = [str(r["kind"]) for r in records]
        weight_shapes = [tuple(int(d) for d in r["weight_shape"]) for r in records]
        seed = int(metadata.get("seed", config.seed))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AdapterFileError(f"{path!r}: unreadable SuperLoRA metadata ({type(error).__name__}: {error})") from None
    if not names or len(set(names)) != len(names):
        raise AdapterFileError(f"{path!r}: the target list is empty or repeats a name")
    if metadata.get("generator_id") != buffers.GENERATOR_ID:
        raise AdapterFileError(
            f"{path!r} was made with buffer generator {metadata.get('generator_id')!r}; this tensoradapt has "
            f"{buffers.GENERATOR_ID!r}, so its fixed projections would differ"
        )
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise AdapterFileError(
            f"{path!r} targets modules the model does not have: {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(names)})"
        )
    found = check_targets(model, [(n, modules[n]) for n in names])
    mismatched = []
    for (name, module), shape, kind, weight_shape in zip(found, shapes, kinds, weight_shapes, strict=True):
        view = weight_view(name, module)
        if (view.shape, view.kind, view.weight_shape) != (shape, kind, weight_shape):
            mismatched.append(f"{name}: file {kind} {shape} (weight {weight_shape}) vs model {view.kind} "
                              f"{view.shape} (weight {view.weight_shape})")
    if mismatched:
        raise AdapterFileError(f"{path!r} does not fit this model, target shapes differ: " + "; ".join(mismatched[:5]))
    dtype = getattr(torch, str(metadata.get("param_dtype")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AdapterFileError(f"{path!r}: param_dtype {metadata.get('param_dtype')!r} is not a floating torch dtype")
    try:
        expected = SuperLoRA(config, shapes, names).parameter_shapes()
    except ValueError as error:
        raise AdapterFileError(f"{path!r}: its config does not fit the targets ({error})") from None
    if set(expected) != set(tensors) or any(list(tensors[k].shape) != list(s) for k, s in expected.items()):
        raise AdapterFileError(f"{path!r}: the stored parameters do not match the plan their config makes")
    return Adapter(model, config, found, freeze_base=freeze_base, seed=seed, dtype=dtype, values=tensors)

