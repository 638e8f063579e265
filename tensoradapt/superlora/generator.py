r"""``SuperLoRA(config, shapes)``: the ΔW generator over all targeted weights and its VJP.

The groups, folds and splits come from :class:`~tensoradapt.superlora.plan.Plan` (shapes only;
nothing is materialised until :meth:`SuperLoRA.init` or :meth:`SuperLoRA.delta`).  For each group
``g`` (docs/math.md §2)::

    X_g = X_{g,1} ⊗ … ⊗ X_{g,K}          (or X_{g,1} ⊙ X_{g,2} for unit="hadamard")
    z_g = Cut_{n_g}(X_g)                 (the first n_g row-major entries)
    y_g = s_g · F_g(z_g)                 (F = identity, Shuffle or Fastfood)
    ΔW_i = the entries of target i in concat_g(y_g)

and the VJP runs the same chain backwards with each operator's analytic adjoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import buffers
from .._backend import check_floating, compat_namespace, device_of, from_host, indexed, namespace
from ..ops import Fastfood, Shuffle, cp_to_tensor, kron, kron_vjp, tucker_to_tensor
from ..ops.projection import CounterFastfood
from . import slices
from .plan import GroupPlan, Plan, SplitPlan, param_name, param_prefix

__all__ = ["GroupPlan", "SplitPlan", "SuperLoRA"]


def _counter_fastfood(op: Any) -> bool:
    """Whether ``op`` is a generator-2 Fastfood (its ``compact`` / padded ``overwrite`` paths)."""
    return isinstance(op, CounterFastfood)


def _format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


class SuperLoRA(Plan):
    r"""The SuperLoRA generator for an ordered list of target weight shapes.

    A :class:`~tensoradapt.superlora.plan.Plan` (groups, folds, splits, projections, parameter
    names) with the computations over it: :meth:`init`, :meth:`delta`, :meth:`delta_for`,
    :meth:`vjp`, :meth:`vjp_for`, :meth:`components`, :meth:`describe`, and per target
    :meth:`sliceable`, :meth:`delta_target` and :meth:`vjp_target`.

    Its parameters (``config``, ``shapes``, ``names``) and attributes are the plan's; see
    :class:`~tensoradapt.superlora.plan.Plan`.

    Attributes named ``_process_*`` are per-process caches that bindings keep on a plan (e.g. the
    torch bindings' ``torch.compile`` operator keys): copies and pickles leave them out.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_process_")}

    # ------------------------------------------------------------------ init
    def init(self, seed: int = 0, xp: Any = None, dtype: Any = None, device: Any = None, *,
             zero: bool = True) -> dict[str, Any]:
        """Trainable parameters as a flat ``{name: array}`` dict.

        With ``zero=True`` (default) exactly one block of every product is zero, so ``ΔW = 0`` at
        step 0 with a non-zero gradient (docs/math.md D10): the last split's core (Tucker), ``λ``
        (CP), mode-0 factor (identity core) or tensor (dense); every other block is Gaussian
        with standard deviation ``1/√d`` for a ``(d, r)`` factor, ``1/√(last side)`` for a dense
        split and 1 for a core.  Values come from :mod:`tensoradapt.buffers`, so the same seed gives
        the same parameters on every backend.  ``zero=False`` makes every block random (tests).

        Parameters
        ----------
        seed : int
        xp : module, optional
            Array library (``numpy``, ``torch``, ``cupy``, ``array_api_strict``…); default NumPy.
        dtype : dtype, optional
            Default ``xp.float32``.
        device : optional
            Device of the arrays (backend-specific).
        """
        if xp is None:
            xp = np
        space = compat_namespace(xp)
        dtype = dtype if dtype is not None else space.float32
        out = {}
        for group in self.groups:
            last = len(group.splits)
            for k, split in enumerate(group.splits, start=1):
                for name, shape in split.parameter_shapes().items():
                    full = param_name(group.index, k, name)
                    size = math.prod(shape)
                    if zero and k == last and name == split.zero_block:
                        host = np.zeros(size, dtype=np.float32)
                    else:
                        if name.startswith("factor") or name == "dense":
                            std = 1.0 / math.sqrt(shape[0] if name.startswith("factor") else shape[-1])
                        else:
                            std = 1.0
                        host = buffers.gaussian(size, seed, 0, "init." + full) * std
                    out[full] = from_host(space, host.reshape(shape), dtype=dtype, device=device)
        return out

    # ------------------------------------------------------------------ forward
    def _check_params(self, params: Mapping[str, Any], groups: Sequence[int] | None = None) -> Any:
        """Validate ``params`` (all of the plan's, or exactly those of ``groups``); return the namespace."""
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a mapping of name -> array, got {type(params).__name__}")
        expected = self.parameter_shapes(groups)
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ValueError(f"params do not match the plan: missing {missing[:5]}, unexpected {extra[:5]}")
        if not params:
            raise ValueError("params is empty: the requested groups have no trainable arrays")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ValueError(f"params[{name!r}] must have shape {shape}, got {tuple(params[name].shape)}")
        xp = namespace(**params)
        check_floating(xp, list(params.items()))
        return xp

    def _split_forward(self, xp: Any, split: SplitPlan, p: Mapping[str, Any]) -> Any:
        if split.kind == "dense":
            return p["dense"]
        factors = self._factors(xp, split, p)
        if split.kind == "tucker":
            return tucker_to_tensor(p["core"], factors)
        return cp_to_tensor(p["weights"] if split.kind == "cp" else None, factors)

    def _factors(self, xp: Any, split: SplitPlan, p: Mapping[str, Any]) -> list[Any]:
        out = []
        for m, d in enumerate(split.shape):
            if m in split.fixed_modes:
                ref = next(iter(p.values()))
                out.append(xp.eye(d, dtype=ref.dtype, device=device_of(ref)))
            else:
                out.append(p[f"factor{m}"])
        return out

    def _local(self, params: Mapping[str, Any], g: int, k: int) -> dict[str, Any]:
        """Split ``k`` of group ``g``'s arrays by local name: a lookup of the plan's own names
        (not a scan of ``params``, which would make a forward quadratic in the targets)."""
        prefix = param_prefix(g, k)
        return {block: params[prefix + block] for block in self.groups[g].splits[k - 1].parameter_shapes()}

    @staticmethod
    def _scaled(local: dict[str, Any], scale: float) -> dict[str, Any]:
        """``local`` with its smallest block multiplied by ``scale``: the product is multilinear,
        so this scales the split's output at the cost of the smallest array, not of ΔW."""
        if scale == 1.0:
            return local
        name = min(local, key=lambda key: math.prod(local[key].shape))
        return {**local, name: local[name] * scale}

    def _group_output(self, xp: Any, group: GroupPlan, params: Mapping[str, Any]) -> Any:
        locals_ = [self._local(params, group.index, k) for k in range(1, len(group.splits) + 1)]
        locals_[0] = self._scaled(locals_[0], group.scale)
        parts = [self._split_forward(xp, s, p) for s, p in zip(group.splits, locals_, strict=True)]
        if len(parts) == 1:
            tensor = parts[0]
        elif self.config.unit == "hadamard":
            tensor = parts[0] * parts[1]
        else:
            tensor = kron(parts)
        if self.config.layout == "stack":
            return tensor
        z = xp.reshape(tensor, (-1,))[: group.n]
        op = self.group_projection(group.index)
        if op is None:
            return z
        if len(self.groups) > 1 and _counter_fastfood(op):
            return op.apply(z, compact=True)  # do not keep every group's length-L work array
        return op.apply(z)

    def delta(self, params: Mapping[str, Any]) -> list[Any]:
        """``[ΔW_1, …, ΔW_S]``, each with its target's shape, on the params' backend and device."""
        return self.delta_for(params, range(len(self.shapes)))

    def delta_for(self, params: Mapping[str, Any], indices: Sequence[int]) -> list[Any]:
        """``ΔW_i`` for the given target indices only, computing just the groups they need.

        ``params`` holds either every trainable array or exactly those of the groups the targets
        need (:meth:`groups_for`), so a caller can keep one group's arrays apart from the rest.
        """
        indices = list(indices)
        needed = self.groups_for(indices)
        xp = self._check_params(params, None if len(params) == self.num_arrays else needed)
        if self.global_shuffle:
            outputs = [self._group_output(xp, group, params) for group in self.groups]
            shuffled = self.projection(None).apply(xp.concat(outputs))
            return self.grouping.to_targets(self.grouping.split(shuffled), targets=indices)
        outputs = {g: self._group_output(xp, self.groups[g], params) for g in needed}
        return self.grouping.to_targets(outputs, targets=indices)

    def components(self) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
        """Independent pieces of the generator: ``((targets, groups), …)`` in target order.

        Two targets are in one component when some group feeds both (an integer ``G`` may cut
        through a weight; a global shuffle ties everything together).  The targets of a component
        are exactly the ones its groups feed, so its ``ΔW`` (:meth:`delta_for`) and its gradient
        (:meth:`vjp_for`) need nothing from the other components: the torch bindings generate
        and differentiate one component at a time.
        """
        count = len(self.shapes)
        if self.global_shuffle:
            return ((tuple(range(count)), tuple(range(len(self.groups)))),)
        parent = list(range(count))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for members in self.grouping.members:
            for i in members[1:]:
                parent[root(i)] = root(members[0])
        by_root: dict[int, list[int]] = {}
        for i in range(count):
            by_root.setdefault(root(i), []).append(i)
        out = []
        for targets in sorted(by_root.values()):
            out.append((tuple(targets), self.grouping.groups_for(targets)))
        return tuple(out)

    # ------------------------------------------------------------------ VJP
    def vjp(self, params: Mapping[str, Any], cotangents: Sequence[Any]) -> dict[str, Any]:
        """Gradients ``∂L/∂θ`` (same keys as ``params``) given ``W̄_i = ∂L/∂ΔW_i`` for every target."""
        xp = self._check_params(params)
        if not isinstance(cotangents, (list, tuple)) or len(cotangents) != len(self.shapes):
            raise ValueError(f"cotangents must be a list of {len(self.shapes)} arrays (one per target)")
        cotangents = list(cotangents)
        self.grouping.check_cotangents(cotangents)
        namespace(**indexed("cotangents", cotangents), **params)
        check_floating(xp, [("params", next(iter(params.values()))), ("cotangents[0]", cotangents[0])])
        if self.global_shuffle:
            merged = self.projection(None).adjoint(xp.concat(self.grouping.from_targets(cotangents)))
            group_cots = self.grouping.split(merged)

            def cotangent_of(g: int) -> Any:
                return group_cots[g]
        else:
            def cotangent_of(g: int) -> Any:  # one group at a time keeps the peak at one group
                group = self.groups[g]
                # without a projection, gather the pieces and zero-pad for the cut in one concat
                return self.grouping.group_cotangent(xp, cotangents, g, self._cotangent_pad(group))
        return self._groups_vjp(xp, params, range(len(self.groups)), cotangent_of)

    def _groups_vjp(self, xp: Any, params: Mapping[str, Any], groups: Iterable[int],
                    cotangent_of: Callable[[int], Any]) -> dict[str, Any]:
        grads: dict[str, Any] = {}
        for g in groups:
            group = self.groups[g]
            local = self._group_vjp(xp, group, params, cotangent_of(g))
            grads.update({name: v * group.scale if group.scale != 1.0 else v for name, v in local.items()})
        return grads

    def vjp_for(self, params: Mapping[str, Any], indices: Sequence[int],
                cotangents: Sequence[Any]) -> dict[str, Any]:
        """Gradients of the arrays of the groups ``indices`` need, given ``W̄_i`` for those targets.

        ``indices`` must be closed under the groups (every target fed by one of those groups is
        listed), as the targets of a :meth:`components` entry are; ``cotangents[j]`` belongs to
        target ``indices[j]``.  ``params`` holds every array or exactly those groups' arrays; the
        result holds those groups' arrays only.
        """
        indices = [int(i) for i in indices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"indices must not repeat a target, got {indices}")
        needed = self.groups_for(indices)
        fed = sorted({i for g in needed for i in self.grouping.members[g]})
        if self.global_shuffle:
            fed = list(range(len(self.shapes)))
        if sorted(indices) != fed:
            raise ValueError(
                f"indices {sorted(indices)} are not closed under their groups {list(needed)}: those groups also "
                f"feed targets {sorted(set(fed) - set(indices))}; pass a component's targets (see components())"
            )
        if not isinstance(cotangents, (list, tuple)) or len(cotangents) != len(indices):
            raise ValueError(f"cotangents must be a list of {len(indices)} arrays (one per index)")
        if len(indices) == len(self.shapes):
            order = sorted(range(len(indices)), key=indices.__getitem__)
            full = [cotangents[j] for j in order]
            grads = self.vjp(params, full)
            return grads if len(params) == len(grads) else {k: grads[k] for k in params}
        xp = self._check_params(params, None if len(params) == self.num_arrays else needed)
        for i, c in zip(indices, cotangents, strict=True):
            if tuple(c.shape) != self.shapes[i]:
                raise ValueError(f"the cotangent of target {i} must have shape {self.shapes[i]}, got {tuple(c.shape)}")
        namespace(**indexed("cotangents", list(cotangents)), **params)
        check_floating(xp, [("cotangents[0]", cotangents[0])])
        full: list[Any] = [None] * len(self.shapes)
        for i, c in zip(indices, cotangents, strict=True):
            full[i] = c

        def cotangent_of(g: int) -> Any:
            group = self.groups[g]
            return self.grouping.group_cotangent(xp, full, g, self._cotangent_pad(group))

        return self._groups_vjp(xp, params, needed, cotangent_of)

    def cotangent_length(self, g: int) -> int:
        """The length of the flat output cotangent :meth:`vjp_group` takes for group ``g`` (layout
        ``"fold"``, no global shuffle): ``N_g`` followed by zeros up to the generated tensor without a
        projection (the adjoint of the cut) or up to a generator-2 Fastfood's ``L`` (its adjoint then
        works in that array, overwriting it)."""
        if self.config.layout != "fold" or self.global_shuffle:
            raise ValueError("cotangent_length and vjp_group apply to layout='fold' without a global shuffle")
        group = self.groups[g]
        return self._cotangent_pad(group) or group.size

    def vjp_group(self, params: Mapping[str, Any], g: int, cotangent: Any) -> dict[str, Any]:
        """Gradients of group ``g``'s arrays given its output cotangent: a flat array of
        :meth:`cotangent_length` entries whose first ``N_g`` are ``∂L/∂y_g`` in the group's
        row-major target order (:meth:`Grouping.target_pieces`) and the rest zeros.

        Lets a caller gather the cotangents of a group's targets straight into one array (as the
        torch bindings' projected components do) instead of a list of target-shaped arrays; the
        array may be overwritten (a generator-2 Fastfood's adjoint works in place).  ``params`` holds
        every array or exactly group ``g``'s.
        """
        length = self.cotangent_length(g)
        xp = self._check_params(params, None if len(params) == self.num_arrays else [g])
        if tuple(cotangent.shape) != (length,):
            raise ValueError(f"the cotangent of group {g} must have shape ({length},), got {tuple(cotangent.shape)}")
        check_floating(xp, [("cotangent", cotangent)])
        return self._groups_vjp(xp, params, [g], lambda _: cotangent)

    def _cotangent_pad(self, group: GroupPlan) -> int | None:
        """The length group ``group``'s gathered cotangent is zero-padded to: the generated tensor
        without a projection (the adjoint of the cut), a generator-2 Fastfood's ``L`` (its adjoint
        then works in that one array), else none."""
        if self.config.layout != "fold":
            return None
        op = self.group_projection(group.index)
        if op is None:
            return math.prod(group.shape)
        if _counter_fastfood(op) and op.length > group.size:
            return op.length
        return None

    def _group_vjp(self, xp: Any, group: GroupPlan, params: Mapping[str, Any], cot: Any) -> dict[str, Any]:
        if self.config.layout != "stack":
            op = self.group_projection(group.index)
            if op is None:
                z_cot = cot
            elif _counter_fastfood(op) and (
                    cot.shape[0] > group.size or len(self.grouping.members[group.index]) > 1):
                # padded by _cotangent_pad, or gathered from several targets: a fresh array, reusable
                z_cot = op.adjoint(cot, overwrite=True)
                cot = None  # the length-L workspace: freed before the reshape below allocates
            else:
                z_cot = op.adjoint(cot)
            total = math.prod(group.shape)
            if z_cot.shape[0] < total:
                z_cot = xp.concat([z_cot, xp.zeros((total - z_cot.shape[0],), dtype=z_cot.dtype,
                                                   device=device_of(z_cot))])
            cot = xp.reshape(z_cot, group.shape)
        locals_ = [self._local(params, group.index, k) for k in range(1, len(group.splits) + 1)]
        if len(locals_) == 1:  # no product: the split's cotangent is the group's (no recomputation)
            return self._named_split_vjp(xp, group, locals_, [cot])
        parts = [self._split_forward(xp, s, p) for s, p in zip(group.splits, locals_, strict=True)]
        if self.config.unit == "hadamard":
            part_cots = [cot * parts[1], cot * parts[0]]
        else:
            part_cots = kron_vjp(parts, cot)
        return self._named_split_vjp(xp, group, locals_, part_cots)

    def _named_split_vjp(self, xp: Any, group: GroupPlan, locals_: list[dict[str, Any]],
                         part_cots: list[Any]) -> dict[str, Any]:
        grads = {}
        for k, (split, p, c) in enumerate(zip(group.splits, locals_, part_cots, strict=True), start=1):
            for name, value in self._split_vjp(xp, split, p, c).items():
                grads[param_name(group.index, k, name)] = value
        return grads

    def _split_vjp(self, xp: Any, split: SplitPlan, p: Mapping[str, Any], cot: Any) -> dict[str, Any]:
        """A whole split's VJP: the slab VJP over all of mode 0 (:func:`.slices.split_slab_vjp`)."""
        return slices.split_slab_vjp(xp, split, p, 0, 0, split.shape[0], cot)

    # ------------------------------------------------------------------ one target (docs/math.md §3.2.3)
    def sliceable(self, index: int) -> bool:
        """Whether target ``index``'s ``ΔW`` can be generated without the rest of its groups.

        True without a projection (layout ``"fold"`` or ``"stack"``): the target then reads a slab
        of each group it overlaps.  A projection ``F_g`` (Shuffle, Fastfood) mixes every entry of
        its group, and a global shuffle every group, so those targets are not sliceable.
        """
        self.grouping.groups_for([index])  # validates the index
        return self.config.projection == "none" and self.config.layout in ("fold", "stack")

    def _sliceable_or_raise(self, index: int) -> int:
        if not self.sliceable(index):
            scope = "global " if self.global_shuffle else ""
            raise ValueError(
                f"target {index} is not sliceable: a target is generated on its own only without a projection "
                f"(layout 'fold' or 'stack', projection='none'), but this plan has a {scope}"
                f"projection={self.config.projection!r} that mixes whole groups; use delta_for / vjp_for")
        return int(index)

    def _slice_locals(self, params: Mapping[str, Any], g: int, scale: bool) -> list[dict[str, Any]]:
        locals_ = [self._local(params, g, k) for k in range(1, len(self.groups[g].splits) + 1)]
        if scale:  # exactly as _group_output: the smallest block of split 1
            locals_[0] = self._scaled(locals_[0], self.groups[g].scale)
        return locals_

    def delta_target(self, params: Mapping[str, Any], index: int) -> Any:
        """``ΔW_index`` in its own shape, at a cost proportional to the target (docs/math.md §3.2.3).

        Equals ``delta_for(params, [index])[0]`` (to rounding) but generates only the mode-1 slab of
        each group the target overlaps (the stack layout: its column block), not the whole group.
        ``params`` holds every trainable array or exactly those of ``groups_for([index])``.

        Raises
        ------
        ValueError
            When the target is not :meth:`sliceable` (a projection), or ``params`` do not match.
        """
        index = self._sliceable_or_raise(index)
        needed = self.groups_for([index])
        xp = self._check_params(params, None if len(params) == self.num_arrays else needed)
        return slices.target_delta(xp, self, index, lambda g: self._slice_locals(params, g, True))

    def vjp_target(self, params: Mapping[str, Any], index: int, cotangent: Any) -> dict[str, Any]:
        """Gradients of the arrays of ``groups_for([index])`` given ``W̄ = ∂L/∂ΔW_index`` (target shape).

        The gradient of ``<W̄, delta_target(params, index)>``: rows of a factor that the target's
        slabs do not read get zeros.  Same cost rule and errors as :meth:`delta_target`.
        """
        index = self._sliceable_or_raise(index)
        needed = self.groups_for([index])
        xp = self._check_params(params, None if len(params) == self.num_arrays else needed)
        if tuple(cotangent.shape) != self.shapes[index]:
            raise ValueError(f"the cotangent of target {index} must have shape {self.shapes[index]}, "
                             f"got {tuple(cotangent.shape)}")
        namespace(cotangent=cotangent, **params)
        check_floating(xp, [("params", next(iter(params.values()))), ("cotangent", cotangent)])
        per_group = slices.target_vjp(xp, self, index, cotangent, lambda g: self._slice_locals(params, g, False))
        grads: dict[str, Any] = {}
        for g, local in per_group.items():  # the scale as in _groups_vjp: on the unscaled VJP
            scale = self.groups[g].scale
            grads.update({name: v * scale if scale != 1.0 else v for name, v in local.items()})
        return grads

    # ------------------------------------------------------------------ reporting
    def describe(self) -> str:
        """A text table: groups, members, generator shapes, split shapes, padding, ρ, params and the
        bytes of fixed random buffers each group's projection holds (``buffers``)."""
        cfg = self.config
        state = [self._buffer_bytes(group) for group in self.groups]
        lines = [
            f"SuperLoRA: {len(self.shapes)} targets, N = {self.grouping.total:,}, G = {len(self.groups)}, "
            f"core={cfg.core}, M={cfg.order}, K={cfg.splits}, projection={cfg.projection}, "
            f"layout={cfg.layout}, trainable = {self.num_params:,}, "
            f"buffers = {_format_bytes(sum(state))} ({self.generator_id.split(' ')[0]})",
            f"{'group':>5} {'targets':<16} {'N_g':>12} {'n_g':>12} {'rho':>7} {'generated':<18} "
            f"{'pad':>9} {'splits':<34} {'params':>10} {'buffers':>10}",
        ]
        for group in self.groups:
            members = self.grouping.members[group.index]
            targets = ",".join(map(str, members)) if len(members) <= 4 else f"{members[0]}..{members[-1]}"
            splits = " x ".join(f"{s.kind}{list(s.shape)}" for s in group.splits)
            lines.append(
                f"{group.index:>5} {targets:<16} {group.size:>12,} {group.n:>12,} "
                f"{group.n / group.size:>7.4f} {'x'.join(map(str, group.shape)):<18} {group.padding:>9,} "
                f"{splits:<34} {group.num_params:>10,} {_format_bytes(state[group.index]):>10}"
            )
        return "\n".join(lines)

    def _buffer_bytes(self, group: GroupPlan) -> int:
        """Host bytes of group ``group``'s fixed random buffers (a global Shuffle counts in group 0)."""
        cfg = self.config
        if cfg.projection == "fastfood":
            return Fastfood.state_bytes_for(group.n, group.size, self.generator_id)
        if cfg.projection == "shuffle":
            size = self.grouping.total if self.global_shuffle else group.size
            if self.global_shuffle and group.index != 0:
                return 0
            return Shuffle.state_bytes_for(size, self.generator_id)
        return 0

    def __repr__(self) -> str:
        return (f"SuperLoRA(targets={len(self.shapes)}, groups={len(self.groups)}, "
                f"params={self.num_params:,}, config={self.config!r})")

