"""What a base layer is to an adapter: its kind, its weight as a matrix, its functional forward.

* :func:`forward_kind` and :func:`base_forward`: the explicit functional form of every supported
  module kind with the module's own settings (no forward swaps or mutates a module's parameters,
  so concurrent forwards are safe); :func:`is_quantized` recognises quantised linear layers;
* :class:`WeightView` / :func:`weight_view`: how a target's stored weight maps to the ``(o, n)``
  matrix an adapter generates and back (the rule itself is the core's, :mod:`tensoradapt._targets`);
* :func:`replace_module` and :func:`plain_named_modules`: module surgery, and the model's modules
  as if no adapter were attached;
* the wrappers' shared pieces: :class:`ReadsThrough`, the ``state_dict`` hooks that keep a plain
  model's keys, :class:`ThreadState` (forward-scoped state per thread) and :func:`graph_task_id`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensoradapt._targets import TargetView, is_conv1d, target_view

__all__ = ["ADAPTER_ATTRIBUTE", "ReadsThrough", "TargetSpec", "ThreadState", "WeightView", "accept_base_keys",
           "base_forward", "forward_kind", "graph_task_id", "is_quantized", "plain_named_modules",
           "replace_module", "report_base_keys", "weight_view"]

ADAPTER_ATTRIBUTE = "tensoradapt"  # where an adapter registers itself on its model

#: A target specification: module-name suffixes, one regular expression, or ``callable(name, module)``.
TargetSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---------------------------------------------------------------------------------- module kinds
def is_quantized(module: nn.Module) -> bool:
    """A quantised linear layer: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, or an ``nn.Linear``
    whose weight is a tensor subclass (torchao's int8 weight-only quantisation)."""
    kind = type(module)
    if kind.__module__.split(".")[0] == "bitsandbytes" and kind.__name__ in ("Linear4bit", "Linear8bitLt"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) \
        and type(weight.data) not in (torch.Tensor, nn.Parameter)


def forward_kind(name: str, module: nn.Module) -> str:
    """How a target's forward is computed functionally: ``"linear"``, ``"conv1d"`` (transformers'
    Conv1D), ``"conv"`` (``nn.Conv1d/2d/3d``), ``"embedding"`` or ``"quantized"`` (a quantised
    linear layer, run as ``base(x) + x ΔWᵀ``); ``TypeError`` for anything else (a module whose
    forward the adapter cannot reproduce with another weight)."""
    kind = type(module)
    if is_quantized(module):
        return "quantized"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return "linear"
    for conv in _CONVS:
        if isinstance(module, conv) and kind.forward is conv.forward:
            return "conv"
    if isinstance(module, nn.Embedding) and kind.forward is nn.Embedding.forward:
        if module.max_norm is not None:
            raise TypeError(f"target {name!r} is an nn.Embedding with max_norm={module.max_norm}: its forward "
                            "renormalises the weight in place, which an adapter cannot do safely; target "
                            "other layers or set max_norm=None")
        return "embedding"
    raise TypeError(
        f"target {name!r} is a {kind.__name__}; adapters support nn.Linear, transformers' Conv1D, "
        "nn.Conv1d/2d/3d and nn.Embedding (modules whose forward can be run with another weight)"
    )


def _conv_padding(module: nn.Module) -> tuple[list[int], Any]:
    """``(F.pad amounts, the padding F.convNd gets)`` for a convolution whose padding_mode is not
    'zeros' (the rule of torch's own ``_ConvNd``)."""
    kernel, dilation = module.kernel_size, module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0, 0] * len(kernel), 0
        amounts: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel), strict=True):
            total = d * (k - 1)
            amounts += [total // 2, total - total // 2]
        return amounts, 0
    amounts = []
    for p in reversed(module.padding):
        amounts += [p, p]
    return amounts, 0


def base_forward(module: nn.Module, kind: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``module``'s forward on ``x`` with ``weight`` (in the stored layout) and ``bias`` in place of
    its own, with the module's own settings; the module itself is never touched."""
    if kind == "linear":
        return F.linear(x, weight, bias)
    if kind == "conv1d":  # transformers' Conv1D: y = x W + b, W stored (in, out)
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return out.reshape(*x.shape[:-1], weight.shape[1])
    if kind == "conv":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
        padding: Any = module.padding
        if module.padding_mode != "zeros":
            amounts, padding = _conv_padding(module)
            x = F.pad(x, amounts, mode=module.padding_mode)
        return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)
    if kind == "embedding":
        return F.embedding(x, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq,
                           module.sparse)
    raise TypeError(f"unknown module kind {kind!r}")  # pragma: no cover - forward_kind refuses first


# ---------------------------------------------------------------------------------- the (o, n) view
@dataclass(frozen=True)
class WeightView(TargetView):
    """A :class:`tensoradapt._targets.TargetView` (``kind``, ``(o, n)`` ``shape``,
    ``weight_shape``) that maps ``ΔW`` back to the stored layout.  ``padding_idx``: an embedding's
    padding row, which PyTorch keeps fixed and an update therefore never changes."""

    padding_idx: int | None = None

    def to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """``ΔW`` ``(o, n)`` → the stored weight's layout (transposed for Conv1D, reshaped for convs)."""
        if self.kind == "conv1d":
            return delta.t()
        if self.kind == "weight" and len(self.weight_shape) != 2:
            return delta.reshape(self.weight_shape)
        return delta

    def update_to_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """An update ``ΔW`` in the stored layout (:meth:`to_weight`), with an embedding's padding row
        zeroed (out of place, so gradients flow to every other row)."""
        update = self.to_weight(delta)
        if self.padding_idx is None:
            return update
        keep = torch.ones(update.shape[0], 1, dtype=update.dtype, device=update.device)
        keep[self.padding_idx] = 0
        return update * keep

    def weight_to_update(self, grad: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`update_to_weight`: a gradient in the stored weight's layout → the
        gradient of the ``(o, n)`` update (padding row zeroed, Conv1D transposed back, convolutions
        flattened)."""
        if self.padding_idx is not None:
            keep = torch.ones(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
            keep[self.padding_idx] = 0
            grad = grad * keep
        if self.kind == "conv1d":
            return grad.t()
        return grad.reshape(self.shape)


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


def weight_view(name: str, module: nn.Module) -> WeightView:
    """The :class:`WeightView` of a targeted module; ``TypeError`` when it has no usable weight."""
    if is_quantized(module):  # the stored weight is packed: the layer's own sizes give (o, n)
        shape = (int(module.out_features), int(module.in_features))
        return WeightView("linear", shape, shape)
    view = target_view(name, module, is_array=_is_tensor)
    padding = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
    return WeightView(view.kind, view.shape, view.weight_shape, None if padding is None else int(padding))


# ---------------------------------------------------------------------------------- models with wrappers
def plain_named_modules(model: nn.Module, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` as if no adapter were attached: the adapters' container is
    skipped and every wrapper is replaced by its ``base_layer`` under the wrapper's name."""
    renames: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if name == ADAPTER_ATTRIBUTE or name.startswith(ADAPTER_ATTRIBUTE + "."):
            continue
        for old, new in renames.items():
            if name == old or name.startswith(old + "."):
                name = new + name[len(old):]
                break
        if getattr(module, "is_tensoradapt_wrapper", False):
            renames[f"{name}.base_layer" if name else "base_layer"] = name
            continue
        yield name, module


def report_base_keys(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
    """``state_dict`` post-hook of the wrappers: the base layer's entries under the wrapper's own
    name (``…c_attn.weight``, not ``…c_attn.base_layer.weight``), so a full state dict of an adapted
    model has the plain model's keys (plus ``tensoradapt.…``) and loads into a plain model."""
    inner = f"{prefix}base_layer."
    for key in [k for k in state if k.startswith(inner)]:  # the wrapper's entries came last: order kept
        state[prefix + key[len(inner):]] = state.pop(key)


def accept_base_keys(module: nn.Module, state: dict[str, Any], prefix: str, local: Any, strict: bool,
                     missing: list[str], unexpected: list[str], errors: list[str]) -> None:
    """``load_state_dict`` pre-hook of the wrappers: entries under the wrapper's name go to its
    base layer, so both a plain model's state dict and one of the older ``base_layer`` form load."""
    inner = f"{prefix}base_layer."
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(inner)]:
        if inner + key[len(prefix):] not in state:
            state[inner + key[len(prefix):]] = state.pop(key)


class ReadsThrough:
    """Mixin for wrappers holding ``base_layer``: attributes they lack (``weight``, ``bias``,
    ``in_features``…) are read from the wrapped module, for code that inspects its layers."""

    is_tensoradapt_wrapper = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's lookup
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)  # type: ignore[misc]


class ThreadState:
    """Forward-scoped state, one per thread (a ``threading.local`` that survives ``copy.deepcopy``
    and pickling by starting empty)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._local = threading.local()

    def get(self) -> Any:
        state = getattr(self._local, "value", None)
        if state is None:
            state = self._local.value = self._factory()
        return state

    def clear(self) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> ThreadState:
        return ThreadState(self._factory)

    def __getstate__(self) -> dict[str, Any]:
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._factory = state["_factory"]
        self._local = threading.local()


def graph_task_id() -> int:
    """Id of the autograd backward pass running now, -1 outside one (the private hook
    ``torch.utils.checkpoint`` itself uses; -1 where a torch build lacks it)."""
    probe = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if probe is None else int(probe())
