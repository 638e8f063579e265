r"""The one target view: which modules a target specification selects, and how each module's
weight maps to the ``(o, n)`` matrix an adapter generates.

Used by :func:`tensoradapt.analysis.shapes_from_model` (parameter counts without a framework
binding) and by :mod:`tensoradapt.torch` (``attach``), so that counting a model's targets and
attaching an adapter to them always see the same shapes.  Everything is duck-typed on the module
(no framework is imported here):

* ``nn.Linear`` (and subclasses): kind ``"linear"``, weight ``(o, n)``, matrix ``(o, n)``;
* transformers' ``Conv1D`` (GPT-2, type name ``Conv1D`` with ``nf``): kind ``"conv1d"``, weight
  stored ``(n, o)``, matrix ``(o, n)``;
* convolutions: kind ``"weight"``, weight ``(o, i/groups, k…)``, matrix ``(o, i/groups · Π k)``;
* ``nn.Embedding``: kind ``"weight"``, weight and matrix ``(num, dim)``;
* any other module with a 2-D weight: kind ``"weight"``, weight and matrix ``(o, n)``.

A target specification is a non-empty list of module-name suffixes (PEFT's ``target_modules``
rule: ``"query"`` matches ``encoder.layer.0.attention.self.query``, whole name components only),
one regular expression matched against the whole name (``re.fullmatch``), or a callable
``(name, module) -> bool``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "TargetView", "is_conv1d", "is_linear", "select_targets", "target_matcher", "target_view"]

#: The kinds of :class:`TargetView`.
KINDS = ("linear", "conv1d", "weight")


def is_conv1d(module: Any) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: Any) -> bool:
    """``torch.nn.Linear`` or a subclass, recognised by its class hierarchy (torch is not imported)."""
    return any(cls.__name__ == "Linear" and cls.__module__.split(".")[:2] == ["torch", "nn"]
               for cls in type(module).__mro__)


@dataclass(frozen=True)
class TargetView:
    """How a target's stored weight relates to the ``(o, n)`` matrix the adapter generates.

    Attributes
    ----------
    kind : {"linear", "conv1d", "weight"}
        ``"linear"``: ``nn.Linear`` (weight ``(o, n)``); ``"conv1d"``: transformers' ``Conv1D``
        (weight stored transposed, ``(n, o)``); ``"weight"``: any other module with an ``(o, …)``
        weight (convolutions: ``(o, i/groups, k…)``, embeddings: ``(num, dim)``), adapted as the
        ``(o, ∏ rest)`` matrix.
    shape : tuple of int
        The ``(o, n)`` matrix shape ``ΔW`` has.
    weight_shape : tuple of int
        The stored weight's shape.
    """

    kind: str
    shape: tuple[int, int]
    weight_shape: tuple[int, ...]


def target_view(name: str, module: Any, *, is_array: Callable[[Any], bool] | None = None) -> TargetView:
    """The :class:`TargetView` of a module; ``TypeError`` when it has no weight an adapter can use.

    ``is_array(weight)`` says whether ``module.weight`` is an array of the caller's framework
    (the torch bindings pass ``isinstance(w, torch.Tensor)``); by default anything with a
    ``shape`` is.

    Examples
    --------
    >>> class Conv1D:                       # transformers' GPT-2 layer: weight stored (in, out)
    ...     nf = 96
    ...     class weight:
    ...         shape = (32, 96)
    >>> target_view("c_attn", Conv1D())
    TargetView(kind='conv1d', shape=(96, 32), weight_shape=(32, 96))
    """
    weight = getattr(module, "weight", None)
    shape = getattr(weight, "shape", None)
    if shape is None or (is_array is not None and not is_array(weight)):
        raise TypeError(
            f"target {name!r} ({type(module).__name__}) has no `weight` tensor; targets must be nn.Linear, "
            "transformers' Conv1D or a module with a 2-D or convolution weight"
        )
    shape = tuple(int(d) for d in shape)
    if is_conv1d(module):
        if len(shape) != 2:
            raise TypeError(f"target {name!r}: a Conv1D weight must be 2-D, got shape {shape}")
        return TargetView("conv1d", (shape[1], shape[0]), shape)
    if is_linear(module) and len(shape) == 2:
        return TargetView("linear", (shape[0], shape[1]), shape)
    if len(shape) < 2:
        raise TypeError(
            f"target {name!r} ({type(module).__name__}) has a {len(shape)}-D weight of shape {shape}; "
            "only 2-D and convolution (o, i, k…) weights can be adapted"
        )
    return TargetView("weight", (shape[0], math.prod(shape[1:])), shape)


def target_matcher(targets: str | Sequence[str] | Callable[[str, Any], bool]) -> Callable[[str, Any], bool]:
    r"""The predicate ``(name, module) -> bool`` of a target specification.

    Raises
    ------
    ValueError
        ``targets`` is a string that is not a valid regular expression.
    TypeError
        ``targets`` is none of a non-empty list of non-empty strings, a string, or a callable.

    Examples
    --------
    >>> keep = target_matcher(["query", "value"])
    >>> keep("layer.0.query", None), keep("layer.0.myquery", None), keep("value", None)
    (True, False, True)
    >>> target_matcher(r"layer\.\d+\.query")("layer.12.query", None)
    True
    """
    if callable(targets):
        return targets
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(f"targets={targets!r} is not a valid regular expression: {error}") from None
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(targets, Sequence) and targets and all(isinstance(t, str) and t for t in targets):
        suffixes = tuple(targets)
        return lambda name, module: any(name == s or name.endswith("." + s) for s in suffixes)
    raise TypeError(
        "targets must be a non-empty list of module-name suffixes, a regular expression string, or a "
        f"callable (name, module) -> bool; got {targets!r:.80}"
    )


def select_targets(named_modules: Iterable[tuple[str, Any]],
                   targets: str | Sequence[str] | Callable[[str, Any], bool]) -> list[tuple[str, Any]]:
    """The ``(name, module)`` pairs of ``named_modules`` (e.g. ``model.named_modules()``) that
    ``targets`` selects, in their order; the root module (name ``""``) is never a target.

    Raises
    ------
    ValueError, TypeError
        As :func:`target_matcher`.
    """
    keep = target_matcher(targets)
    return [(name, module) for name, module in named_modules if name and keep(name, module)]
