"""Which modules of a model an adapter targets.

Targets are chosen the way PEFT users expect: a list of module-name suffixes, one regular
expression (matched against the whole module name), or a callable ``(name, module) -> bool``;
without one, the attention projections of known architectures (:data:`DEFAULT_TARGETS`, diffusers'
:data:`DIFFUSERS_DEFAULT_TARGETS`), else every linear layer but the output head (``"all-linear"``).
Matches come in ``model.named_modules()`` order, which is the order of the SuperLoRA target list
(docs/math.md D1).  The selection rule and the module → ``(kind, (o, n), stored shape)`` rule live
in the core (:mod:`tensoradapt._targets`); this module adds the torch-side checks (tied or aliased
weights, modules of other adapters, ``modules_to_save``) and :func:`shapes_from_model`, the
``(o, n)`` matrices of a model's targets (reached from the core as
:func:`tensoradapt.analysis.shapes_from_model` through the ``tensoradapt.model_shapes`` entry point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tensoradapt._targets import is_conv1d, is_linear, select_targets, target_matcher, target_view
from tensoradapt.analysis.shapes import ShapeSourceError, Target

from .container import container_of
from .files.layout import AdapterFileError
from .modules import ADAPTER_ATTRIBUTE, TargetSpec, plain_named_modules

__all__ = ["DEFAULT_TARGETS", "DIFFUSERS_ATTENTION", "DIFFUSERS_DEFAULT_TARGETS", "DIFFUSERS_RESNET_CONVS",
           "check_model_targets", "check_targets", "default_targets", "diffusers_targets", "is_diffusers_model",
           "match_targets", "resolve_targets", "select_modules_to_save", "shapes_from_model"]


def match_targets(model: nn.Module, targets: TargetSpec) -> list[tuple[str, nn.Module]]:
    """The modules of ``model`` that ``targets`` selects, in ``model.named_modules()`` order.

    Parameters
    ----------
    model : nn.Module
    targets : list of str, str or callable
        Module-name suffixes (``["q_proj", "v_proj"]`` matches ``layers.0.attn.q_proj``; a
        suffix matches whole name components only), a regular expression that must match the
        whole name (``r".*\\.(query|value)"``), or ``callable(name, module) -> bool``.

    Returns
    -------
    list of (name, module)

    Raises
    ------
    ValueError
        Nothing matched (the message lists a few module names to help fix the pattern).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = select_targets(model.named_modules(), targets)
    if not found:
        names = [name for name, _ in model.named_modules() if name]
        raise ValueError(
            f"targets={targets!r:.80} matched no module of {type(model).__name__}; "
            f"module names look like {names[:6]}"
        )
    return found


# ---------------------------------------------------------------------------------- defaults
#: The attention projections ``attach(model)`` adapts, by ``model.config.model_type`` (PEFT's choice).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "vit": ("q_proj", "v_proj", "query", "value"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
}
#: Last name components treated as an output head by the ``"all-linear"`` fallback.
_HEADS = ("lm_head", "classifier", "score", "head", "qa_outputs", "output_projection")


def _linear_like(module: nn.Module) -> bool:
    return is_linear(module) or is_conv1d(module)


def default_targets(model: nn.Module) -> list[str]:
    """The module names ``attach(model)`` adapts without targets: the attention projections of a
    known architecture (:data:`DEFAULT_TARGETS`, by ``model.config.model_type``), else every
    ``nn.Linear`` / ``Conv1D`` except the output head (the ``"all-linear"`` rule).  A diffusers
    model gets its attention projections (:data:`DIFFUSERS_DEFAULT_TARGETS`)."""
    diffusion = diffusers_default_targets(model)
    if diffusion:
        return diffusion
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    suffixes = DEFAULT_TARGETS.get(model_type) if isinstance(model_type, str) else None
    if suffixes:
        found = [name for name, _ in match_targets_or_empty(model, list(suffixes))]
        if found:
            return found
    return _all_linear(model)


def match_targets_or_empty(model: nn.Module, targets: Any) -> list[tuple[str, nn.Module]]:
    """The modules ``targets`` selects among the model's plain modules (wrappers read as their base
    layer), an empty list when none matches."""
    return select_targets(plain_named_modules(model), targets)


def _all_linear(model: nn.Module) -> list[str]:
    head = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    modules = list(plain_named_modules(model))
    names = [name for name, module in modules if name and _linear_like(module)
             and module is not head and name.rpartition(".")[2] not in _HEADS]
    if head is None and names and not any(n.rpartition(".")[2] in _HEADS for n, _ in modules):
        names = names[:-1]  # no known head: the last linear layer is the output
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layer to adapt besides its output head")
    return names


def resolve_targets(model: nn.Module, targets: Any, exclude: Any) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` targets of ``attach(model, config, targets, exclude=exclude)``:
    :func:`default_targets` for ``None``, the ``"all-linear"`` rule, else :func:`match_targets`;
    minus ``exclude``."""
    if targets is None:
        names = default_targets(model)
    elif isinstance(targets, str) and targets == "all-linear":
        names = _all_linear(model)
    else:
        names = [name for name, _ in match_targets(model, targets)]
        wrapped = {f"{name}.base_layer" for name in names}  # a matched wrapper stands for its base layer
        names = [n for n in names if n not in wrapped]
    if exclude is not None:
        dropped = {name for name, _ in match_targets_or_empty(model, exclude)}
        names = [n for n in names if n not in dropped]
        if not names:
            raise ValueError(f"exclude={exclude!r:.80} removes every target")
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in names]  # wrappers of other adapters: their base layer (check_targets)


# ---------------------------------------------------------------------------------- diffusers
#: The attention projections of diffusers' attention blocks (``Attention.to_q`` … ``to_out[0]``).
DIFFUSERS_ATTENTION: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
#: The convolutions of diffusers' ResNet blocks (``ResnetBlock2D`` and kin), LoCon's conv targets.
DIFFUSERS_RESNET_CONVS: tuple[str, ...] = ("conv1", "conv2", "conv_shortcut")
#: The module-name suffixes ``attach(model)`` adapts on a diffusers model, by class name (the
#: attention projections, as diffusers' own LoRA training scripts choose); any other diffusers model
#: with ``to_q`` layers gets :data:`DIFFUSERS_ATTENTION` too.
DIFFUSERS_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = dict.fromkeys((
    "UNet2DConditionModel", "UNet2DModel", "UNet3DConditionModel", "UNetSpatioTemporalConditionModel",
    "SD3Transformer2DModel", "FluxTransformer2DModel", "Transformer2DModel", "DiTTransformer2DModel",
    "PixArtTransformer2DModel", "HunyuanDiT2DModel", "SanaTransformer2DModel", "AuraFlowTransformer2DModel",
    "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel", "WanTransformer3DModel",
), DIFFUSERS_ATTENTION)


def is_diffusers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers model (a subclass of ``diffusers.ModelMixin``; diffusers is
    not imported)."""
    return any(cls.__name__ == "ModelMixin" and cls.__module__.split(".")[0] == "diffusers"
               for cls in type(model).__mro__)


def diffusers_targets(model: nn.Module, *, attention: bool = True, resnets: bool = False) -> list[str]:
    """The module names of a diffusers model to adapt: its attention projections and, with
    ``resnets=True``, the convolutions of its ResNet blocks (LoCon-style conv targets).

    Parameters
    ----------
    model : nn.Module
        A diffusers model (``UNet2DConditionModel``, ``SD3Transformer2DModel``,
        ``FluxTransformer2DModel``, …) or any module holding one.
    attention : bool
        Include ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (:data:`DIFFUSERS_ATTENTION`).
    resnets : bool
        Include ``conv1``, ``conv2`` and ``conv_shortcut`` of every ResNet block
        (:data:`DIFFUSERS_RESNET_CONVS`; the blocks whose class name starts with ``Resnet``).

    Returns
    -------
    list of str
        In ``model.named_modules()`` order; pass it as ``targets=`` to :func:`tensoradapt.torch.attach`.

    Raises
    ------
    ValueError
        Nothing was selected, or both kinds were switched off.

    Examples
    --------
    >>> from torch import nn
    >>> class Attention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.to_q, self.to_k, self.to_v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    ...         self.to_out = nn.ModuleList([nn.Linear(4, 4), nn.Dropout()])
    >>> diffusers_targets(nn.ModuleDict({"attn": Attention()}))
    ['attn.to_q', 'attn.to_k', 'attn.to_v', 'attn.to_out.0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (attention or resnets):
        raise ValueError("attention=False and resnets=False select nothing; switch one on")
    modules = dict(plain_named_modules(model))
    projection = target_matcher(list(DIFFUSERS_ATTENTION))  # the core's suffix rule
    names = []
    for name, module in modules.items():
        parent, _, last = name.rpartition(".")
        if attention and projection(name, module) and isinstance(module, nn.Linear):
            names.append(name)
        elif resnets and last in DIFFUSERS_RESNET_CONVS and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) \
                and type(modules.get(parent)).__name__.startswith("Resnet"):
            names.append(name)
    if not names:
        kinds = " and ".join(k for k, on in (("attention projections", attention), ("ResNet convolutions", resnets))
                             if on)
        raise ValueError(f"{type(model).__name__} has no diffusers {kinds} "
                         f"({', '.join(DIFFUSERS_ATTENTION + DIFFUSERS_RESNET_CONVS)})")
    return names


def diffusers_default_targets(model: nn.Module) -> list[str] | None:
    """What ``attach(model)`` adapts on a diffusers model (its attention projections,
    :data:`DIFFUSERS_DEFAULT_TARGETS`), None for any other model or one without them."""
    if not is_diffusers_model(model):
        return None
    suffixes = DIFFUSERS_DEFAULT_TARGETS.get(type(model).__name__, DIFFUSERS_ATTENTION)
    found = [name for name, module in select_targets(plain_named_modules(model), list(suffixes))
             if isinstance(module, nn.Linear)]
    return found or None


# ---------------------------------------------------------------------------------- refusals
def _storage_key(tensor: torch.Tensor) -> Any:
    if tensor.numel() == 0 or tensor.device.type == "meta":  # meta tensors all report storage 0
        return ("id", id(tensor))
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return ("id", id(tensor))


def check_targets(model: nn.Module, found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Refuse targets a wrapper cannot adapt faithfully: already adapted modules, modules reachable
    under several names, weights shared with any other module (tied weights: a merge would change
    both), and the ``out_proj`` of an ``nn.MultiheadAttention``."""
    found = [(name, module.base_layer if getattr(module, "is_tensoradapt_wrapper", False) else module)
             for name, module in found]  # a target another adapter already wraps: shared (checked at install)
    for name, module in found:
        if getattr(module, "is_tensoradapt_wrapper", False) or ".base_layer" in f".{name}" \
                or f"{ADAPTER_ATTRIBUTE}." in f"{name}.":
            raise RuntimeError(f"module {name!r} belongs to an attached adapter; detach it first")
    aliases: dict[int, list[str]] = {}
    owners: dict[Any, list[str]] = {}  # storage of every parameter → "module.param" names
    for name, module in plain_named_modules(model, remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            where = f"{name}.{pname}" if name else pname
            keys = {("id", id(p)), _storage_key(p)}
            for key in keys:
                owners.setdefault(key, [])
                if where not in owners[key]:
                    owners[key].append(where)
    for name, module in found:
        names = aliases.get(id(module), [name])
        if len(names) > 1:
            raise ValueError(
                f"target {name!r} is one module reachable under several names {names}: a wrapper on one name "
                "would leave the others unadapted; untie the module or do not target it"
            )
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            own = f"{name}.weight"
            sharing: list[str] = []
            for key in ({("id", id(weight)), _storage_key(weight)}):
                sharing += [w for w in owners.get(key, []) if w != own and w not in sharing]
            if sharing:
                others = ", ".join(repr(w.rpartition(".")[0] or w) for w in sharing[:3])
                raise ValueError(
                    f"target {name!r} shares its weight with module {others} (tied weights, e.g. an output "
                    "head tied to the input embedding): merging or saving would change both; untie them "
                    "(tie_word_embeddings=False) or do not target it"
                )
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(
                f"target {name!r} belongs to an nn.MultiheadAttention, whose forward reads its weights "
                "directly and would bypass the adapter; target other layers"
            )
    return found


def select_modules_to_save(model: nn.Module, spec: Any, targets: Sequence[str]) -> list[str]:
    """Names of the modules ``modules_to_save`` selects (same forms as targets), checked: not a
    target, not nested in another selected module, not the model itself."""
    if spec is None:
        return []
    if isinstance(spec, str) and not any(c in spec for c in "\\.*+?[](){}|^$"):
        spec = [spec]
    found = [name for name, _ in select_targets(model.named_modules(), spec)]
    if not found:
        raise ValueError(f"modules_to_save={spec!r:.80} matched no module of {type(model).__name__}")
    for name in found:
        if f"{ADAPTER_ATTRIBUTE}." in f"{name}." or ".base_layer" in f".{name}":
            raise RuntimeError(f"module {name!r} belongs to an attached adapter")
        for target in targets:
            if target == name or target.startswith(name + ".") or name.startswith(target + "."):
                raise ValueError(f"module {name!r} is both a target (or holds one: {target!r}) and in "
                                 "modules_to_save; choose one")
    container = container_of(model)
    for adapter in container.adapters() if container is not None else ():
        for name in found:
            for other in (*adapter.modules_to_save, *adapter.target_names):
                if other == name or other.startswith(name + ".") or name.startswith(other + "."):
                    raise ValueError(f"module {name!r} overlaps {other!r} of adapter {adapter.adapter_name!r} "
                                     "(a target or in its modules_to_save); choose another module")
    nested = [n for n in found if any(n.startswith(m + ".") for m in found)]
    return [n for n in found if n not in nested]


def check_model_targets(model: torch.nn.Module, metadata: dict[str, Any], where: str) -> list[tuple[str, Any]]:
    """The model's modules the file targets, refused like at attach (``AdapterFileError``)."""
    modules = dict(plain_named_modules(model))
    names = [r["name"] for r in metadata["targets"]]
    missing = [n for n in names if n not in modules]
    if missing:
        raise AdapterFileError(
            f"{where} targets modules the model does not have: {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''} ({len(missing)} of {len(names)})"
        )
    try:
        return check_targets(model, [(n, modules[n]) for n in names])
    except (TypeError, ValueError, RuntimeError) as error:
        raise AdapterFileError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------- counting
def shapes_from_model(model: Any, targets: str | Sequence[str] | Callable[[str, Any], bool] | None = None, *,
                      min_ndim: int = 2) -> list[Target]:
    r"""Target weights of a torch model, in ``model.named_modules()`` order (docs/math.md D1).

    The shapes are the ``(o, n)`` matrices an adapter generates for the modules, by the same rule
    :func:`tensoradapt.torch.attach` uses, so ``count_params(config, shapes_from_model(model,
    targets))`` is the ``num_params`` of ``attach(model, config, targets)``: ``(out, in)`` for
    ``nn.Linear`` and for transformers' ``Conv1D`` (whose weight is stored ``(in, out)``),
    ``(o, i/groups · Π k)`` for convolutions, ``(num, dim)`` for embeddings.  A weight of fewer than
    two dimensions (with ``min_ndim=1``) keeps its stored shape.

    Parameters
    ----------
    model : torch.nn.Module
    targets : sequence of str, str or callable, optional
        Module selection, as for :func:`tensoradapt.torch.attach`: a sequence of names, each
        matching a module whose qualified name equals it or ends with ``"." + name`` (PEFT's
        ``target_modules`` rule, e.g. ``["query", "value"]``), one string used as a regular
        expression (matched against the whole qualified name), or ``callable(name, module) -> bool``.
        Default: every module with a weight of at least ``min_ndim`` dimensions.
    min_ndim : int
        Skip weights with fewer dimensions (default 2; norms and biases are not targets).

    Returns
    -------
    list of Target
        Names are the weights' ``state_dict`` keys (``<module>.weight``).

    Raises
    ------
    TypeError
        If ``model`` is not a ``torch.nn.Module``, ``targets`` is not a selection, or a selected
        module has no weight ``attach`` could adapt (the same message ``attach`` gives).
    ShapeSourceError
        If no module matches, or ``targets`` is not a valid regular expression.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.named_modules())
    if targets is not None:  # the modules attach() would target (never the root module)
        try:
            modules = select_targets(modules, targets)
        except ValueError as exc:
            raise ShapeSourceError(str(exc)) from None
    out = []
    for qualified, module in modules:
        weight = getattr(module, "weight", None)
        is_tensor = isinstance(weight, torch.Tensor)
        # a selected module attach() would refuse raises attach()'s error here too
        view = target_view(qualified, module) if (targets is not None and not is_tensor) or (
            is_tensor and weight.ndim >= 2) else None
        if not is_tensor or weight.ndim < min_ndim:
            continue
        shape = view.shape if view is not None else tuple(int(d) for d in weight.shape)
        out.append(Target(f"{qualified}.weight" if qualified else "weight", shape,
                          str(weight.dtype).removeprefix("torch.")))
    if not out:
        raise ShapeSourceError(f"no module of the model matches targets={targets!r} "
                               f"(with a weight of at least {min_ndim} dimensions)")
    return out
