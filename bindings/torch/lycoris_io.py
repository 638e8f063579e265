r"""LyCORIS / kohya ``.safetensors`` files out and in: the diffusion ecosystem's adapter format.

ComfyUI, LyCORIS, kohya-ss' scripts and diffusers' ``load_lora_weights`` read one ``.safetensors``
file whose keys are ``<kohya name>.<tensor>``, the kohya name being a prefix and the module path
with ``.`` → ``_`` (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``).  Per
module (``o`` outputs, ``n = in/groups · Π kernel``): LoRA (LoCon on a convolution)
``lora_down.weight (r, in/groups, *kernel)``, ``lora_up.weight (o, r, 1…)``, ``ΔW = (α/r) up down``;
LoKr ``lokr_w1 (a, b)`` or ``lokr_w1_a`` + ``lokr_w1_b``, ``lokr_w2 (c, e)`` (``(c, in_n, *kernel)``
on a convolution) or ``lokr_w2_a`` + ``lokr_w2_b``, ``ΔW = (α/r) w1 ⊗ w2``; LoHa ``hada_w1_a (o, r)``,
``hada_w1_b (r, n)``, ``hada_w2_a``, ``hada_w2_b``, ``ΔW = (α/r) (w1a w1b) ⊙ (w2a w2b)``; each with a
scalar ``alpha``.

LyCORIS's scale conventions (``lycoris.modules``): ``α/r`` with ``r`` the LoRA rank (LoHa:
``hada_w1_b``'s rows; LoKr: the rank of ``w1_a``, else ``w2_a``); a missing ``alpha`` or ``α = 0``
means ``α = r`` (scale 1); a LoKr whose two blocks are both full has scale 1 whatever ``alpha`` says.

:func:`export_lycoris` writes an adapter so: LoRA, LoKr and LoHa targets natively (exact), any
other target (grouped, folded, projected, shapes LyCORIS has no name for, LoKr blocks LyCORIS would
lay out differently, GLoRA) as a LoRA/LoCon holding its truncated SVD, through
:mod:`tensoradapt.torch.peft_io`'s SVD export, with each target's relative error reported.
:func:`import_lycoris` (in :mod:`tensoradapt.torch._lycoris_import`) reads such a file back into an
adapter on a model.  docs/interop.md (Diffusion) has the details and the peers it is tested with.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from tensoradapt._safetensors import SafetensorsHeaderError, read_header
from tensoradapt._version import __version__

from ._io import LIBRARY, canonical_header, write_bytes
from ._lycoris_import import import_lycoris
from ._shared import BaseAdapter

if TYPE_CHECKING:  # peft_io's internals are imported where used, so a change there cannot break this import
    from .peft_io import Source, Target

__all__ = ["KOHYA_PREFIXES", "LycorisExport", "export_lycoris", "import_lycoris", "kohya_names", "kohya_prefix"]

#: The key prefixes kohya-style files use: the denoiser (``lora_unet``; ``lora_transformer`` for
#: diffusers-named DiT weights, OneTrainer's and ComfyUI's name), the text encoders (``lora_te``;
#: ``lora_te1``/``lora_te2``/``lora_te3`` with several) and LyCORIS's own wrapper (``lycoris``).
KOHYA_PREFIXES = ("lora_unet", "lora_transformer", "lora_te", "lora_te1", "lora_te2", "lora_te3", "lycoris")
#: The kohya prefix of each diffusers pipeline component, for a model holding them as children.
_COMPONENTS = {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder": "lora_te",
               "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
_PREFIX_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------------- names
def kohya_prefix(model: nn.Module) -> str:
    """The key prefix a kohya file uses for a whole ``model``: ``"lora_transformer"`` for a diffusers
    transformer (SD3, Flux, PixArt, …), ``"lora_unet"`` for any other diffusers model, ``"lora_te"``
    for a transformers model (a text encoder), else ``"lora_unet"``."""
    from ._targets import is_diffusers_model

    if is_diffusers_model(model):
        return "lora_transformer" if "Transformer" in type(model).__name__ else "lora_unet"
    if any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__):
        return "lora_te"
    return "lora_unet"


def check_prefix(prefix: Any) -> str | None:
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string or None, got {type(prefix).__name__}")
    if not _PREFIX_RULE.fullmatch(prefix):
        raise ValueError(f"prefix={prefix!r:.60} must be letters, digits and underscores (e.g. 'lora_unet', "
                         f"'lora_te1'); known prefixes: {', '.join(KOHYA_PREFIXES)}")
    return prefix


def kohya_names(model: nn.Module | None, names: list[str], prefix: str | None = None) -> dict[str, str]:
    """``{module name: kohya name}`` for the modules ``names`` of ``model``.

    ``prefix`` (e.g. ``"lora_te1"``) applies to every module; without it a model whose children are
    diffusers pipeline components (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``,
    ``text_encoder_3``) names each module by its component (``text_encoder`` is ``lora_te1`` beside a
    ``text_encoder_2``) relative to that component, and any other model by :func:`kohya_prefix`.
    ``ValueError`` when two modules would get one name (``a_b.c`` and ``a.b_c``)."""
    out: dict[str, str] = {}
    children = dict(model.named_children()) if model is not None else {}
    components = {k: v for k, v in _COMPONENTS.items() if k in children} if prefix is None else {}
    if "text_encoder" in components and "text_encoder_2" in components:
        components["text_encoder"] = "lora_te1"
    whole = prefix or (kohya_prefix(model) if model is not None else "lora_unet")
    for name in names:
        head, _, rest = name.partition(".")
        if head in components and rest:
            out[name] = f"{components[head]}_{rest.replace('.', '_')}"
        else:
            out[name] = f"{whole}_{name.replace('.', '_')}"
    seen: dict[str, str] = {}
    for name, key in out.items():
        if key in seen:
            raise ValueError(f"modules {seen[key]!r} and {name!r} both have the kohya name {key!r} ('.' becomes "
                             "'_'); a kohya file cannot tell them apart: adapt only one of them")
        seen[key] = name
    return out


# ---------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class LycorisExport:
    """What :func:`export_lycoris` wrote.

    Attributes
    ----------
    path : Path
        The ``.safetensors`` file.
    keys : dict of str to str
        Each target's kohya name (the key prefix of its tensors).
    algorithms : dict of str to str
        Each target's LyCORIS algorithm: ``"lora"`` (``"locon"`` on a convolution), ``"lokr"`` or
        ``"loha"``.
    ranks : dict of str to int
        Each target's rank (0 for a LoKr whose two blocks are full).
    errors : dict of str to float
        Each target's relative error ``‖ΔW − ΔW_file‖_F / ‖ΔW‖_F`` (0.0 when written exactly; for
        GLoRA the bias update, which a kohya file cannot hold, counts as error too).
    """

    path: Path
    keys: Mapping[str, str] = field(default_factory=dict)
    algorithms: Mapping[str, str] = field(default_factory=dict)
    ranks: Mapping[str, int] = field(default_factory=dict)
    errors: Mapping[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        width = max([len("target"), *(len(n) for n in self.keys)])
        worst = max(self.errors.values(), default=0.0)
        lines = [f"LyCORIS file {str(self.path)!r}: {len(self.keys)} targets, largest relative error {worst:.3e}",
                 f"{'target':<{width}}  {'algo':>5}  {'rank':>5}  {'rel. error':>10}"]
        for name in self.keys:
            lines.append(f"{name:<{width}}  {self.algorithms[name]:>5}  {self.ranks[name]:>5}  "
                         f"{self.errors.get(name, 0.0):>10.3e}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- LoKr layout
def _lycoris_factorization(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's ``factorization`` (sorted ``(m, n)``, ``m·n = dim``): tensoradapt's rule."""
    from tensoradapt.superlora.factorize import factorization

    return factorization(dim, factor if factor > 0 else -1)


def _lycoris_lokr_reads(target: Target, w1: tuple[int, int], q1: int | None, w2: tuple[int, ...],
                       q2: int | None) -> bool:
    """Whether LyCORIS's loader, given LoKr blocks ``w1`` (rank ``q1``, None when full) and ``w2``
    (as stored: ``(c, in_n, *kernel)`` full on a convolution, else ``(c, e)``; rank ``q2``), rebuilds
    exactly these blocks on ``target``: it infers ``factor`` from the shapes and lays the module out
    again (``lycoris.modules.lokr``), so only blocks of its own layout survive the round trip."""
    o = target.weight_shape[0]
    conv = target.layer == "conv"
    channels = target.weight_shape[1] if conv else target.shape[1]
    kernel = tuple(target.weight_shape[2:]) if conv else ()
    a, b = w1
    c, e_file = w2[0], w2[1]
    out_total, in_total = a * c, b * e_file
    if (a, b) == (_lycoris_factorization(out_total, -1)[0], _lycoris_factorization(in_total, -1)[0]):
        factor = -1
    else:
        f1, f2 = max(w1), max(w2)
        factor = min(f1, f2)
        for f in (f1, f2):
            if out_total % f == 0 and in_total % f == 0 and f in (a, c) and f in (b, e_file):
                factor = f
                break
    full = q1 is None and q2 is None
    dim = q1 if q1 is not None else q2 if q2 is not None else 1
    out_l, out_k = _lycoris_factorization(o, factor)
    in_m, in_n = _lycoris_factorization(channels, factor)
    low1 = q1 is not None and q2 is not None and dim < max(out_l, in_m) / 2
    low2 = not full and dim < max(out_k, in_n) / 2
    want2 = (out_k, in_n * math.prod(kernel)) if low2 or not conv else (out_k, in_n, *kernel)
    return ((out_l, in_m), low1, want2, low2) == (w1, q1 is not None, tuple(w2), q2 is not None)


# ---------------------------------------------------------------------------------- native forms
def _alpha(source: Source, group: Any, q: int, plain: bool) -> float:
    """The ``alpha`` whose ``α/q`` is the group's scale (the config's own ``alpha`` when that is
    exactly it, so the file's scale is ours bit for bit)."""
    cfg = source.plan.config
    if plain and cfg.alpha is not None and q == cfg.ranks[0] and group.scale == cfg.effective_scale:
        return float(cfg.alpha)
    return float(group.scale) * q


def _lora_entry(target: Target, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    q = up.shape[1]
    if target.layer == "conv":
        up = up.reshape(up.shape[0], q, *(1,) * (len(target.weight_shape) - 2))
        down = down.reshape(q, *target.weight_shape[1:])
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(alpha, dtype=torch.float32)}


def _native(source: Source, i: int) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """``(algorithm, tensors, rank)`` of target ``i`` written exactly, None when it has no LyCORIS form."""
    from .peft_io import exact_form, local_params, low_rank

    form, group = exact_form(source, i)
    target = source.targets[i]
    if form is None:
        return None
    with torch.no_grad():
        pairs = [low_rank(s, local_params(source, group.index, k, s)) if s.kind != "dense" else None
                 for k, s in enumerate(group.splits, start=1)]
    if form == "lora":
        L, R = pairs[0]
        plain = group.splits[0].kind == "identity"
        algo = "locon" if target.layer == "conv" else "lora"
        return algo, _lora_entry(target, L, R, _alpha(source, group, L.shape[1], plain)), L.shape[1]
    if form == "loha":
        q = max(L.shape[1] for L, _ in pairs)
        tensors = {}
        for k, (L, R) in enumerate(pairs, start=1):
            pad = q - L.shape[1]
            tensors[f"hada_w{k}_a"] = torch.nn.functional.pad(L, (0, pad)) if pad else L
            tensors[f"hada_w{k}_b"] = torch.nn.functional.pad(R, (0, 0, 0, pad)) if pad else R
        plain = all(s.kind == "identity" for s in group.splits) and not any(L.shape[1] != q for L, _ in pairs)
        tensors["alpha"] = torch.tensor(_alpha(source, group, q, plain), dtype=torch.float32)
        return "loha", tensors, q
    return _native_lokr(source, target, group, pairs)


def _native_lokr(source: Source, target: Target, group: Any,
                 pairs: list[Any]) -> tuple[str, dict[str, torch.Tensor], int] | None:
    from .peft_io import local_params

    first, second = group.splits
    q1 = None if pairs[0] is None else pairs[0][0].shape[1]
    q2 = None if pairs[1] is None else pairs[1][0].shape[1]
    conv = target.layer == "conv"
    w2_shape: tuple[int, ...] = tuple(second.shape)
    if q2 is None and conv:
        channels = target.weight_shape[1] // first.shape[1] if target.weight_shape[1] % first.shape[1] == 0 else 0
        if not channels or channels * math.prod(target.weight_shape[2:]) != second.shape[1]:
            return None  # the Kronecker blocks split the kernel: LyCORIS keeps it whole in w2
        w2_shape = (second.shape[0], channels, *target.weight_shape[2:])
    if (q1 is not None and q2 is not None and q1 != q2) or \
            not _lycoris_lokr_reads(target, tuple(first.shape), q1, w2_shape, q2):
        return None
    local = {k: local_params(source, group.index, k, s) for k, s in enumerate(group.splits, start=1)}
    scale = float(group.scale)
    tensors: dict[str, torch.Tensor] = {}
    dim = q1 if q1 is not None else q2
    fold = scale if dim is None and scale != 1.0 else 1.0  # two full blocks: LyCORIS's scale is 1
    for k, (pair, split) in enumerate(zip(pairs, group.splits, strict=True), start=1):
        if pair is None:
            value = local[k]["dense"].detach()
            tensors[f"lokr_w{k}"] = (value * fold if k == 1 and fold != 1.0 else value).reshape(
                w2_shape if k == 2 else tuple(split.shape))
        else:
            tensors[f"lokr_w{k}_a"], tensors[f"lokr_w{k}_b"] = pair
    alpha = 1.0 if dim is None else _alpha(source, group, dim, all(s.kind in ("identity", "dense")
                                                                     for s in group.splits))
    tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return "lokr", tensors, dim or 0


# ---------------------------------------------------------------------------------- SVD forms
def _svd_entry(target: Target, delta: torch.Tensor, rank: int | str, dtype: torch.dtype,
               bias: torch.Tensor | None = None) -> tuple[str, dict[str, torch.Tensor], int, float]:
    """A LoRA/LoCon (scale 1: ``α = r``) of ``delta``'s truncated SVD and its relative error (with
    ``bias``, a bias update the file cannot hold, counted as error)."""
    from .peft_io import truncated

    B, A, q, error = truncated(target, delta, rank, dtype)
    if bias is not None:
        dw = float(torch.linalg.matrix_norm(delta.to(torch.float64)))
        db = float(torch.linalg.vector_norm(bias.to(torch.float64)))
        total = math.hypot(dw, db)
        error = math.hypot(error * dw, db) / total if total else 0.0
    return ("locon" if target.layer == "conv" else "lora"), _lora_entry(target, B, A, float(q)), q, error


def _svd_superlora(source: Source, todo: list[int], rank: int | str) -> dict[int, tuple]:
    """SVD entries of the SuperLoRA targets ``todo``: ``ΔW`` in float64, one component at a time."""
    plan = source.plan
    dtype = next(iter(source.params.values())).dtype if source.params else torch.float32
    out_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    wanted = set(todo)
    out: dict[int, tuple] = {}
    for targets, groups in plan.components():
        if not wanted.intersection(targets):
            continue
        params = {name: source.params[name].to(torch.float64) for name in plan.parameter_shapes(groups)}
        with torch.no_grad():
            deltas = plan.delta_for(params, targets)
        for t, delta in zip(targets, deltas, strict=True):
            if t in wanted:
                out[t] = _svd_entry(source.targets[t], delta, rank, out_dtype)
    return out


def _svd_glora(adapter: Any, source: Source, rank: int | str) -> dict[int, tuple]:
    """SVD entries of every GLoRA target: ``ΔW = W' − W0`` of its inference config (the bias update
    ``b' − b0`` is reported as error, with a warning)."""
    if not isinstance(adapter, BaseAdapter) or not adapter.attached:
        raise ValueError("a GLoRA adapter's update W0 ⊙ A + B depends on the base weights: export the adapter "
                         "while it is attached to its model (not a GLoRA file, not a detached adapter)")
    merged = adapter.merged_weight_bias()
    wrappers = {w.index: w for w in adapter.wrappers}
    dtype = next(iter(source.params.values())).dtype
    out_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out: dict[int, tuple] = {}
    lost = []
    for i, target in enumerate(source.targets):
        W, b = merged[target.name]
        W0, b0 = wrappers[i].base_weight_bias()
        delta = W.to(torch.float64) - W0.to(torch.float64)
        bias = None
        if b is not None:
            bias = b.to(torch.float64) - (b0.to(torch.float64) if b0 is not None else 0.0)
            if bool((bias != 0).any()):
                lost.append(target.name)
        out[i] = _svd_entry(target, delta, rank, out_dtype, bias)
    if lost:
        warnings.warn(f"GLoRA changes the biases of {len(lost)} layers (e.g. {lost[0]!r}); a kohya file holds weight "
                      "updates only, so those bias updates are dropped (counted in the reported errors)",
                      UserWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------------------------- export
def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path, got {type(path).__name__}")
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"path {str(out)!r} is a folder; pass the file to write")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {str(out.parent)!r} does not exist")
    try:
        ours = out.is_file() and LIBRARY in read_header(out).metadata
    except (OSError, SafetensorsHeaderError):
        ours = False
    if ours:
        raise ValueError(f"{str(out)!r} holds a tensoradapt adapter; export_lycoris would overwrite it: write the "
                         "LyCORIS file elsewhere")
    return out


def _source_of(adapter: Any) -> Source:
    from .peft_io import file_source, live_source

    if isinstance(adapter, BaseAdapter):
        if adapter.attached and adapter.merged:
            warnings.warn("exporting a merged adapter: the file holds ΔW for the unmerged base weights; load it onto "
                          "the original base model, not this one (whose weights already hold ΔW)", UserWarning,
                          stacklevel=3)
        elif adapter.merged_into_model:
            warnings.warn("exporting an adapter detached by merge_and_detach(): the file holds ΔW for the original "
                          "base weights; that model's weights already hold it", UserWarning, stacklevel=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its warnings speak of PEFT folders; ours are above
            return live_source(adapter)
    if isinstance(adapter, (str, os.PathLike)):
        source = file_source(adapter)
        source.params = {k: v.to("cpu") for k, v in source.params.items()}
        return source
    raise TypeError(f"adapter must be a tensoradapt adapter or the path of an adapter file, got "
                    f"{type(adapter).__name__}")


def _check_targets(source: Source, rank: int | str | None) -> None:
    if isinstance(rank, int):
        for target in source.targets:
            if rank > min(target.shape):
                smallest = min(min(t.shape) for t in source.targets)
                raise ValueError(f"rank={rank} exceeds min(o, n) = {min(target.shape)} of target {target.name!r} "
                                 f"(o, n) = {target.shape}; pass a rank <= {smallest} (the smallest min(o, n) "
                                 "of all targets) or 'exact'")
    if source.modules_to_save:
        raise ValueError(f"{source.origin} trains modules_to_save {list(source.modules_to_save)[:3]} in full; a "
                         "kohya file holds the targets' updates only and would drop them: attach without "
                         "modules_to_save to export it")
    for target in source.targets:
        if target.layer not in ("linear", "conv"):
            what = "a transformers Conv1D" if target.layer == "conv1d" else "an nn.Embedding"
            raise ValueError(f"target {target.name!r} is {what}; LyCORIS and kohya files adapt nn.Linear and "
                             "nn.Conv1d/2d/3d layers only: exclude it")
        module = target.module
        if target.layer == "conv" and module is not None and getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"target {target.name!r} pads with padding_mode={module.padding_mode!r}, but LyCORIS "
                             "and ComfyUI run a convolution's update with zero padding: the outputs would differ")


def export_lycoris(adapter: BaseAdapter | str | os.PathLike[str], path: str | os.PathLike[str],
                   rank: int | Literal["exact"] | None = None, prefix: str | None = None) -> LycorisExport:
    """Write an adapter as one LyCORIS / kohya ``.safetensors`` file (ComfyUI, LyCORIS, kohya-ss,
    diffusers' ``load_lora_weights`` for LoRA/LoCon).

    Parameters
    ----------
    adapter : SuperLoRAAdapter, GLoRAAdapter or path
        An adapter, or one of our adapter files (rebuilt from its metadata; names then get the
        ``"lora_unet"`` prefix unless ``prefix`` is given).
    path : path
        The ``.safetensors`` file, replaced atomically (a tensoradapt adapter file is refused).
    rank : None, int or "exact"
        ``None``: LoRA, LoKr and LoHa targets natively (exact: LoRA/LoCon, LoKr in LyCORIS's block
        layout, LoHa), every other target as the LoRA/LoCon of smallest rank within
        :data:`tensoradapt.torch.peft_io.EXACT_TOLERANCE` (``"exact"``).  ``r`` or ``"exact"``:
        every target as a LoRA/LoCon of its truncated SVD (rank ``r``, or the smallest exact one).
    prefix : str, optional
        The key prefix of every target (``"lora_unet"``, ``"lora_te1"``, …).  Default: per model,
        :func:`kohya_names` (``lora_unet`` for a UNet, ``lora_transformer`` for a diffusers DiT,
        ``lora_te`` for a text encoder; a model of pipeline components by component).

    Returns
    -------
    LycorisExport
        The file, each target's kohya name, algorithm, rank and relative error.

    Raises
    ------
    TypeError, ValueError
        A bad argument, a target kohya files cannot adapt (embeddings, transformers' Conv1D,
        non-zero padding modes), ``modules_to_save``, or two modules of one kohya name.
    AdapterFileError, FileNotFoundError
        ``adapter`` is not a readable adapter file, or the output folder is missing.

    Notes
    -----
    The safetensors metadata records ``tensoradapt_version``, ``tensoradapt_method`` and
    ``tensoradapt_config`` (the adapter's config as JSON) and ``tensoradapt_targets`` (each
    target's key, algorithm, rank and error); ``ss_network_module`` is ``"lycoris.kohya"``.  The
    file holds ``ΔW`` for the unmerged base weights.  ``alpha`` is float32 (``α/r`` equals the
    adapter's scale to float32 rounding, exactly when the config sets ``alpha``).
    """
    from .peft_io import check_rank, svd_threads

    rank = check_rank(rank)
    prefix = check_prefix(prefix)
    out = _check_path(path)
    source = _source_of(adapter)
    _check_targets(source, rank)
    keys = kohya_names(source.model, [t.name for t in source.targets], prefix)
    entries: dict[int, tuple] = {}
    with svd_threads(source):  # small SVDs on the CPU run on one torch thread, as in export_peft
        if source.method == "superlora":
            if rank is None:
                for i in range(len(source.targets)):
                    native = _native(source, i)
                    if native is not None:
                        entries[i] = (*native, 0.0)
            todo = [i for i in range(len(source.targets)) if i not in entries]
            if todo:
                entries.update(_svd_superlora(source, todo, "exact" if rank is None else rank))
        else:
            entries = _svd_glora(adapter, source, "exact" if rank is None else rank)
    tensors: dict[str, torch.Tensor] = {}
    for i, target in enumerate(source.targets):
        for suffix, value in entries[i][1].items():
            tensors[f"{keys[target.name]}.{suffix}"] = value
    names = [t.name for t in source.targets]
    result = LycorisExport(out, {n: keys[n] for n in names}, {n: entries[i][0] for i, n in enumerate(names)},
                           {n: int(entries[i][2]) for i, n in enumerate(names)},
                           {n: float(entries[i][3]) for i, n in enumerate(names)})
    _write(out, tensors, _metadata(source, result, rank))
    return result


def _metadata(source: Source, result: LycorisExport, rank: Any) -> dict[str, str]:
    from .peft_io import EXACT_TOLERANCE

    config = source.plan.config if source.plan is not None else source.glora
    records = [{"name": n, "key": result.keys[n], "algo": result.algorithms[n], "rank": result.ranks[n],
                "error": result.errors[n]} for n in result.keys]
    return {"format": "pt", "ss_network_module": "lycoris.kohya", "tensoradapt_version": __version__,
            "tensoradapt_method": source.method,
            "tensoradapt_config": json.dumps(config.to_dict(), sort_keys=True, allow_nan=False),
            "tensoradapt_export_rank": json.dumps(rank),
            "tensoradapt_targets": json.dumps(records, allow_nan=False),
            "tensoradapt_tolerance": repr(EXACT_TOLERANCE)}


def _write(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    import safetensors.torch

    host = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    write_bytes(out, canonical_header(safetensors.torch.save(host, metadata=metadata)))
