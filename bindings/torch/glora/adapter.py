"""GLoRA on a live PyTorch model: supernet training, evolutionary search, structural merge.

``attach_glora(model, GLoRAConfig(...), targets)`` (:mod:`.method`; also reached through
:func:`tensoradapt.torch.attach`) wraps each targeted ``nn.Linear`` or transformers ``Conv1D`` in a
:class:`GLoRALayer` and registers a :class:`GLoRAAdapter` on the model as ``model.tensoradapt``;
the adapter owns every trainable tensor.  Each wrapped layer computes (docs/math.md §7.1)::

    W' = W0 + W0 ⊙ A + B,   b' = b0 + b0 ⊙ D + E + W0 · C,   y = x W'ᵀ + b'

with the support tensors chosen per layer by a :class:`tensoradapt.glora.LayerChoice`:

* ``model.train()`` and no fixed configs: every call of every adapted layer draws a choice
  uniformly from its search space (the supernet; seeded, reproducible);
* fixed configs (:meth:`GLoRAAdapter.set_configs`, or :func:`.search.search`): those, in any mode;
* ``model.eval()`` and no fixed configs: the **largest** choice of each layer's space (the full
  supernet: A, B, C LoRA at the largest rank, D, E vector), deterministic.

``W'`` and ``b'`` come from an autograd Function whose backward is the core's analytic VJP
(:func:`tensoradapt.glora.vjp`).  :meth:`GLoRAAdapter.merge` is the structural
re-parameterisation: every wrapper is replaced by a fresh module of the original type holding
``W'`` and ``b'`` (zero inference overhead); :meth:`GLoRAAdapter.unmerge` puts the wrappers back
(the original ``W0``, ``b0`` were never modified, so nothing is divided out).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tensoradapt import buffers
from tensoradapt._version import __version__
from tensoradapt.glora import algebra
from tensoradapt.glora.config import TENSORS, GLoRAConfig, LayerChoice, check_bias, largest_choice, search_space

from ..api import load
from ..files.layout import FORMAT, FORMAT_VERSION, AdapterFileError
from ..functional import glora_weight_bias
from ..lifecycle import BaseAdapter
from ..modules import (
    ReadsThrough,
    WeightView,
    accept_base_keys,
    forward_kind,
    graph_task_id,
    report_base_keys,
    weight_view,
)

__all__ = ["GLoRAAdapter", "GLoRALayer"]

_SAMPLE_STREAM = 0x676C6F7261  # "glora": the SeedSequence entropy word of the supernet sampler (the core


class GLoRALayer(ReadsThrough, nn.Module):
    """A targeted ``nn.Linear`` or ``Conv1D`` with GLoRA: ``y = x W'ᵀ + b'``.

    ``base_layer`` is the original module, never modified.  The trainable tensors belong to the
    owning :class:`GLoRAAdapter`.

    Attributes
    ----------
    choice : LayerChoice or None
        The fixed configuration (``None``: sample in train mode, largest in eval mode).
    last_choice : LayerChoice or None
        The configuration used by the most recent forward.
    """

    def __init__(self, base_layer: nn.Module, index: int, view: WeightView, owner: GLoRAAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.view = view
        self.choice: LayerChoice | None = None
        self.last_choice: LayerChoice | None = None
        # W', b' while merged: non-persistent buffers, so they follow .to() and stay out of state_dict()
        self.register_buffer("merged_weight", None, persistent=False)
        self.register_buffer("merged_bias", None, persistent=False)
        object.__setattr__(self, "_owner", owner)  # not a submodule: the adapter is registered on the model
        self.register_state_dict_post_hook(report_base_keys)  # the plain model's keys
        self.register_load_state_dict_pre_hook(accept_base_keys)

    @property
    def merged_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(W' (o, n), b' or None)`` formed by :meth:`GLoRAAdapter.merge` (``None`` when not merged)."""
        weight = self.merged_weight
        return None if weight is None else (weight, self.merged_bias)

    @merged_weight_bias.setter
    def merged_weight_bias(self, value: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        self.merged_weight, self.merged_bias = (None, None) if value is None else value

    def base_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W0 (o, n), b0 (o,) or None)`` of the base layer (a transposed view for Conv1D)."""
        weight = self.base_layer.weight
        W0 = weight.t() if self.view.kind == "conv1d" else weight
        return W0, self.base_layer.bias

    def current_choice(self) -> LayerChoice:
        """The configuration the next forward uses (draws one in train mode without a fixed choice)."""
        owner: GLoRAAdapter = self._owner
        if self.choice is not None:
            return self.choice
        if self.training:
            if self.last_choice is not None and graph_task_id() >= 0:
                # activation checkpointing re-runs this forward during backward: use the choice
                # the forward drew, or the gradients would belong to another configuration
                return self.last_choice
            return owner._sample(self.index)
        return owner._largest[self.index]

    def weight_bias(self, choice: LayerChoice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W', b')`` of this layer for ``choice``, differentiable, in the adapter's dtype."""
        owner: GLoRAAdapter = self._owner
        params = owner._layer_params(self.index)
        dtype = params["A_d"].dtype
        W0, b0 = self.base_weight_bias()
        return glora_weight_bias(W0.to(dtype), None if b0 is None else b0.to(dtype), params, choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner: GLoRAAdapter = self._owner
        if owner.merged and not owner.is_disabled:
            W, b = self.merged_weight_bias  # W', b' computed by merge(), in the base dtype
            return F.linear(x, W, b)
        if not owner.active:
            return self.base_layer(x)
        choice = self.current_choice()
        self.last_choice = choice
        W, b = self.weight_bias(choice)
        W, b = W.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, W, b)  # W' is (o, n) for Linear and Conv1D alike: x W'ᵀ + b'

    def extra_repr(self) -> str:
        o, n = self.view.shape
        state = str(self.choice) if self.choice is not None else "supernet"
        return f"target={self.index}, kind={self.view.kind}, shape=({o}, {n}), config={state}"


class GLoRAAdapter(BaseAdapter):
    """GLoRA attached to a model (made by :func:`attach_glora` / :func:`tensoradapt.torch.attach`).

    Attributes
    ----------
    config : GLoRAConfig
    target_names : tuple of str
        Module names of the adapted layers, in ``named_modules()`` order.
    shapes : tuple of (int, int)
        Each layer's ``(o, n)``.
    has_bias : tuple of bool
        Whether each base layer has a bias (bias-free layers store no ``D``).
    layers : nn.ModuleList
        One ``ParameterDict`` per layer with the stored tensors (:func:`tensoradapt.glora.parameter_shapes`).
    """

    def __init__(self, model: nn.Module, config: GLoRAConfig, found: list[tuple[str, nn.Module]], *,
                 freeze_base: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        views = []
        for name, module in found:
            if forward_kind(name, module) == "quantized":  # also refuses modules it cannot reproduce
                raise TypeError(f"GLoRA needs the dense base weight W0 (W' = W0 + W0 ⊙ A + B), and target {name!r} "
                                f"is a quantised {type(module).__name__}; attach GLoRA to the unquantised model, "
                                "or use a SuperLoRA config (base(x) + x ΔWᵀ) on quantised layers")
            view = weight_view(name, module)
            if view.kind not in ("linear", "conv1d"):
                raise TypeError(f"GLoRA adapts nn.Linear and transformers' Conv1D layers; target {name!r} is a "
                                f"{type(module).__name__} with weight shape {tuple(module.weight.shape)}")
            views.append(view)
        self.config = config
        self._setup_lifecycle(model, found, freeze_base)
        self.pending_configs: tuple[LayerChoice, ...] | None = None  # set by load, fixed at install
        self.views = tuple(views)
        self.shapes = tuple(v.shape for v in views)
        self.has_bias = tuple(getattr(m, "bias", None) is not None for _, m in found)
        first = found[0][1].weight
        if dtype is None:
            dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        layers = []
        for i, ((o, n), bias, (_, module)) in enumerate(zip(self.shapes, self.has_bias, found, strict=True)):
            stored = algebra.init(o, n, config.rank, has_bias=bias, seed=config.seed, layer=i, xp=torch,
                              dtype=dtype, device=module.weight.device)
            layers.append(nn.ParameterDict({k: nn.Parameter(v) for k, v in stored.items()}))
        self.layers = nn.ModuleList(layers)
        self._spaces = tuple(search_space(config, has_bias=b) for b in self.has_bias)
        self._largest = tuple(largest_choice(config, has_bias=b).resolve(config.rank) for b in self.has_bias)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, _SAMPLE_STREAM])))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The identity on its first argument (the work happens in the :class:`GLoRALayer` wrappers;
        the adapter is registered on the model so that ``model.parameters()``, ``.to()`` and
        ``state_dict()`` see its tensors, and ``nn.Sequential`` passes through it unchanged)."""
        return args[0] if args else None

    # ------------------------------------------------------------------ installation
    def _make_wrapper(self, index: int, module: nn.Module) -> nn.Module:
        return GLoRALayer(module, index, self.views[index], self)

    def install(self, *args: Any, **kwargs: Any) -> None:
        super().install(*args, **kwargs)
        if self.pending_configs is not None:  # the per-layer configs of a loaded file (checked by load)
            for wrapper, choice in zip(self._wrappers, self.pending_configs, strict=True):
                wrapper.choice = choice
            self.pending_configs = None

    def _layer_params(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.layers[index].items())

    # ------------------------------------------------------------------ configurations
    def search_spaces(self) -> tuple[tuple[LayerChoice, ...], ...]:
        """Each layer's search space (:func:`tensoradapt.glora.search_space`; ``D`` is ``"none"`` on
        bias-free layers)."""
        return self._spaces

    def reseed(self, seed: int | None = None) -> None:
        """Restart the supernet sampler from ``seed`` (default ``config.seed``)."""
        seed = self.config.seed if seed is None else int(seed)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SAMPLE_STREAM])))

    def _sample(self, index: int) -> LayerChoice:
        space = self._spaces[index]
        return space[int(self._rng.integers(len(space)))]

    def _normalise_configs(self, configs: Any) -> tuple[LayerChoice, ...]:
        """One resolved, validated :class:`LayerChoice` per layer from the forms :meth:`set_configs` takes."""
        count = len(self.target_names)
        if isinstance(configs, LayerChoice) or (
                isinstance(configs, Mapping) and configs and set(configs) <= {*TENSORS, "rank"}):
            choices = [configs] * count
        elif isinstance(configs, Mapping):
            unknown = sorted(set(configs) - set(self.target_names))
            missing = [n for n in self.target_names if n not in configs]
            if unknown or missing:
                raise ValueError(f"configs by name must name every adapted layer exactly: unknown {unknown[:5]}, "
                                 f"missing {missing[:5]}")
            choices = [configs[n] for n in self.target_names]
        elif isinstance(configs, Sequence) and not isinstance(configs, (str, bytes)):
            if len(configs) != count:
                raise ValueError(f"configs must give one LayerChoice per adapted layer ({count}), got {len(configs)}")
            choices = list(configs)
        else:
            raise TypeError("configs must be a LayerChoice (every layer), a sequence with one per layer, or a "
                            f"mapping target name -> LayerChoice; got {type(configs).__name__}")
        out = []
        for name, bias, choice in zip(self.target_names, self.has_bias, choices, strict=True):
            try:
                if not isinstance(choice, LayerChoice):
                    choice = LayerChoice.from_dict(choice)
                check_bias(choice, bias)
                out.append(choice.resolve(self.config.rank))
            except (TypeError, ValueError) as error:
                raise type(error)(f"layer {name!r}: {error}") from None
        return tuple(out)

    def set_configs(self, configs: Any) -> None:
        """Fix each layer's configuration (train and eval mode), or ``None`` to go back to the supernet.

        Parameters
        ----------
        configs : LayerChoice, sequence, mapping or None
            One :class:`LayerChoice` (or ``{"A": …, …}`` dict) for every layer, a sequence with one
            per layer in :attr:`target_names` order, or ``{target name: choice}`` for all layers.
            ``rank=None`` means the supernet rank.  A bias-free layer needs ``D="none"``.
        """
        self._check_attached()
        if self.merged:
            raise RuntimeError("the adapter is merged; call unmerge() before changing its configs")
        choices = (None,) * len(self._wrappers) if configs is None else self._normalise_configs(configs)
        for wrapper, choice in zip(self._wrappers, choices, strict=True):
            wrapper.choice = choice

    @property
    def configs(self) -> tuple[LayerChoice, ...] | None:
        """The fixed per-layer configurations, or ``None`` when the supernet is sampled."""
        choices = tuple(w.choice for w in self._wrappers)
        return None if not choices or any(c is None for c in choices) else choices

    def inference_configs(self) -> tuple[LayerChoice, ...]:
        """What eval mode and :meth:`merge` use: the fixed configs, else each layer's largest choice."""
        return self.configs if self.configs is not None else self._largest

    @property
    def last_configs(self) -> tuple[LayerChoice | None, ...]:
        """The configuration each layer used in its most recent forward (``None``: not called yet)."""
        return tuple(w.last_choice for w in self._wrappers)

    # ------------------------------------------------------------------ counting and reporting
    @property
    def num_params(self) -> int:
        """Number of trainable adapter entries: the stored supernet tensors (:meth:`num_stored_params`;
        ``modules_to_save`` not included).  :meth:`active_params` counts a configuration's."""
        return self.num_stored_params()

    def active_params(self, configs: Any = None) -> int:
        """Active parameters of per-layer ``configs`` (default: the fixed configs), docs/math.md §7.2 counts.

        Raises ``RuntimeError`` when ``configs`` is ``None`` and none are fixed (use
        :attr:`num_params` for the supernet's storage).
        """
        if configs is None:
            configs = self.configs
            if configs is None:
                raise RuntimeError("no configs are fixed; pass configs, or call num_stored_params() for the "
                                   "supernet's stored tensors")
        choices = self._normalise_configs(configs)
        return sum(algebra.count_params(o, n, c, has_bias=b)
                   for (o, n), b, c in zip(self.shapes, self.has_bias, choices, strict=True))

    def num_stored_params(self) -> int:
        """Entries of the stored (supernet) tensors: ``Σ 2r(o+n) + nr + r + 2o`` (``o`` less per bias-free layer)."""
        return sum(algebra.count_stored_params(o, n, self.config.rank, has_bias=b)
                   for (o, n), b in zip(self.shapes, self.has_bias, strict=True))

    def _adapter_parameters(self) -> Any:
        for name, layer in zip(self.target_names, self.layers, strict=True):
            for k, p in layer.items():
                yield f"{name}.{k}", p

    def summary(self) -> str:
        """A table: trainable vs all parameters, then each layer's shape, bias, config and active count."""
        stored = self.num_stored_params()
        configs = self.configs
        state = "merged" if self.merged else "disabled" if self._disabled else "active"
        lines = [
            self._trainable_line(),
            f"GLoRA supernet: rank {self.config.rank}, stored {stored:,} params, {len(self.target_names)} layers, "
            f"state={state}, configs={'fixed' if configs is not None else 'supernet (eval: largest)'}",
        ]
        if configs is not None:
            lines.append(f"active params of the fixed configs: {self.active_params():,}")
        lines.append(f"{'#':>4} {'target':<36} {'kind':<7} {'(o, n)':<12} {'bias':<5} {'active':>9}  config")
        for i, name in enumerate(self.target_names):
            o, n = self.shapes[i]
            choice = configs[i] if configs is not None else self._largest[i]
            active = algebra.count_params(o, n, choice, has_bias=self.has_bias[i])
            lines.append(f"{i:>4} {name:<36} {self.views[i].kind:<7} {f'{o}x{n}':<12} {self.has_bias[i]!s:<5} "
                         f"{active:>9,}  {choice}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ merge / unmerge / detach
    @torch.no_grad()
    def merged_weight_bias(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``{target name: (W' (o, n), b' (o,) or None)}`` for :meth:`inference_configs`, detached."""
        out = {}
        for wrapper, choice in zip(self._wrappers, self.inference_configs(), strict=True):
            out[self.target_names[wrapper.index]] = wrapper.weight_bias(choice)
        return out

    @torch.no_grad()
    def _apply_merge(self) -> None:
        """Structural re-parameterisation: each layer runs ``x W'ᵀ + b'`` with ``W'``, ``b'`` formed
        once (:meth:`inference_configs`; without fixed configs the largest choice of each layer, with
        a warning) and rounded to the base layer's dtype; the base parameters are never written.
        Refuses (``FloatingPointError``) any ``W'``/``b'`` not finite in the base dtype."""
        if self.configs is None:
            warnings.warn("merging without fixed configs: every layer uses its largest choice (the full "
                          "supernet); call set_configs() or search() first to merge a searched subnet",
                          UserWarning, stacklevel=3)
        merged = []
        for wrapper, (name, (W, b)) in zip(self._wrappers, self.merged_weight_bias().items(), strict=True):
            base = wrapper.base_layer
            W = W.to(base.weight.dtype)
            if b is not None:
                b = b.to(base.bias.dtype if base.bias is not None else base.weight.dtype)
            if not bool(torch.isfinite(W).all()) or (b is not None and not bool(torch.isfinite(b).all())):
                raise FloatingPointError(f"W'/b' of layer {name!r} has non-finite entries in the base dtype "
                                         f"({base.weight.dtype}): it overflows; the model was not changed")
            merged.append((W.contiguous(), None if b is None else b.contiguous()))
        for wrapper, wb in zip(self._wrappers, merged, strict=True):
            wrapper.merged_weight_bias = wb

    def _apply_unmerge(self) -> None:
        for wrapper in self._wrappers:
            wrapper.merged_weight_bias = None

    def _plain_modules(self) -> list[nn.Module]:
        return [_rebuilt(w.base_layer, w.view, *w.merged_weight_bias) for w in self._wrappers]

    # ------------------------------------------------------------------ files
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{"<target name>.<tensor>": tensor}`` for every stored tensor (detached)."""
        return {name: p.detach() for name, p in self._adapter_parameters()}

    def metadata(self) -> dict[str, Any]:
        """JSON metadata of an adapter file: config, targets with ``(o, n)``, bias and kind, the fixed
        per-layer configs (or ``None``), parameter shapes and dtype, seed and generator id."""
        dtype = self.layers[0]["A_d"].dtype
        configs = self.configs
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "method": "glora",
            "config": self.config.to_dict(),
            "targets": [
                {"name": n, "kind": v.kind, "shape": list(v.shape), "has_bias": b}
                for n, v, b in zip(self.target_names, self.views, self.has_bias, strict=True)
            ],
            "configs": None if configs is None else [c.to_dict() for c in configs],
            "parameters": {name: list(t.shape) for name, t in self.state_tensors().items()},
            "param_dtype": str(dtype).removeprefix("torch."),
            "seed": self.config.seed,
            # GLoRA has no fixed projection; its only seeded values (the *_u init) are generator 1's
            # PCG64 streams (glora.algebra through buffers.raw_bits), whatever the default generator
            "generator_id": buffers.GENERATOR_V1,
            "modules_to_save": self._saved_metadata(),
        }

    @classmethod
    def load(cls, model: nn.Module, path: str | os.PathLike[str], *, freeze_base: bool = True) -> GLoRAAdapter:
        """Attach the GLoRA adapter saved at ``path`` to ``model`` (same as :func:`tensoradapt.torch.load`)."""
        adapter = load(model, path, freeze_base=freeze_base)
        if not isinstance(adapter, GLoRAAdapter):
            adapter.detach()
            raise AdapterFileError(f"{str(path)!r} holds a {type(adapter).__name__}, not a GLoRA adapter")
        return adapter


def _rebuilt(base: nn.Module, view: WeightView, W: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    """A deep copy of ``base`` whose weight is ``W`` (in the base layout and dtype) and bias ``b``; the
    base's own weight and bias are never copied (``deepcopy`` memo)."""
    weight = base.weight
    new_weight = nn.Parameter(view.to_weight(W).to(weight.dtype).contiguous(), requires_grad=weight.requires_grad)
    memo: dict[int, Any] = {id(weight): new_weight}
    bias = base.bias
    new_bias = None
    if b is not None:
        dtype = bias.dtype if bias is not None else weight.dtype
        grad = bias.requires_grad if bias is not None else weight.requires_grad
        new_bias = nn.Parameter(b.to(dtype).contiguous(), requires_grad=grad)
        if bias is not None:
            memo[id(bias)] = new_bias
    module = copy.deepcopy(base, memo)
    if new_bias is not None and bias is None:
        module.bias = new_bias  # a bias-free layer gains the bias that C and E make
    return module
