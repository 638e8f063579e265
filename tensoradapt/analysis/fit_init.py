r"""The first stage of :func:`~tensoradapt.analysis.fit.fit`: initial parameters (host, float64)
from decompositions of each group's target, or random ones of the targets' norm.

:func:`decomposition_init` maps each group's entries of the targets back through its fixed
projection (the exact inverse of a Shuffle, the least-squares-scaled adjoint of a Fastfood),
divides by the group's scale, zero-pads to its fold and splits the fold into its Kronecker
factors by the Van Loan–Pitsianis rearrangement (:func:`_nearest_kron`); each split is then
decomposed by its own structure (truncated SVD, HOSVD/HOOI Tucker with fixed-identity modes kept,
CP-ALS), with TensorLy when installed, else NumPy/SciPy.  :func:`random_init` draws every block
and scales one block per group so that ``‖ΔW‖_F`` matches the targets'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..ops import kron_shape
from ..superlora.generator import SuperLoRA
from ..superlora.plan import GroupPlan, SplitPlan, param_name, parse_param_name

__all__ = ["decomposition_init", "random_init"]


# ---------------------------------------------------------------------------------------------
# decompositions (host, float64)
# ---------------------------------------------------------------------------------------------
def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import scipy.linalg

    try:
        return scipy.linalg.svd(x, full_matrices=False)
    except np.linalg.LinAlgError:  # pragma: no cover - gesdd rarely fails; gesvd is the robust driver
        return scipy.linalg.svd(x, full_matrices=False, lapack_driver="gesvd")


def _pad_columns(a: np.ndarray, r: int) -> np.ndarray:
    """``a`` with zero columns appended up to ``r`` columns (a rank above the data's rank)."""
    if a.shape[1] >= r:
        return a[:, :r]
    return np.concatenate([a, np.zeros((a.shape[0], r - a.shape[1]))], axis=1)


def _unfold(t: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def _mode_product(t: np.ndarray, matrix: np.ndarray, mode: int) -> np.ndarray:
    """``t ×_mode matrix`` (``matrix`` of shape ``(new, t.shape[mode])``)."""
    return np.moveaxis(np.tensordot(matrix, t, axes=([1], [mode])), 0, mode)


def _tensorly_available(decomposer: str) -> bool:
    if decomposer == "numpy":
        return False
    try:
        import tensorly  # noqa: F401
    except ImportError:
        if decomposer == "tensorly":
            raise ImportError("decomposer='tensorly' needs TensorLy (pip install tensorly)") from None
        return False
    return True


def _tucker(t: np.ndarray, ranks: Sequence[int], fixed: Sequence[int], use_tensorly: bool,
            iterations: int) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Truncated Tucker of ``t`` with ``ranks`` (modes in ``fixed`` keep an identity factor).

    Returns the core (shape ``ranks``, zero-padded where a rank exceeds what the data allows) and
    the factors (``None`` for fixed modes)."""
    free = [m for m in range(t.ndim) if m not in fixed]
    others = math.prod(t.shape)
    eff = {m: min(ranks[m], t.shape[m], others // t.shape[m]) for m in free}
    factors: dict[int, np.ndarray] = {}
    if use_tensorly and free:
        import tensorly as tl
        from tensorly.decomposition import partial_tucker

        with tl.backend_context("numpy"):
            (_, tl_factors), _ = partial_tucker(t, rank=[eff[m] for m in free], modes=free,
                                                n_iter_max=iterations, init="svd")
        factors = {m: np.asarray(f, dtype=np.float64) for m, f in zip(free, tl_factors, strict=True)}
    else:  # HOSVD: leading left singular vectors of every unfolding
        for m in free:
            u, _, _ = _svd(_unfold(t, m))
            factors[m] = u[:, : eff[m]]
    core = t
    for m in free:
        core = _mode_product(core, factors[m].T, m)
    padded = np.zeros(tuple(ranks))
    padded[tuple(slice(0, s) for s in core.shape)] = core
    return padded, [_pad_columns(factors[m], ranks[m]) if m in factors else None for m in range(t.ndim)]


def _cp_als(t: np.ndarray, rank: int, iterations: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                           list[np.ndarray]]:
    """CP-ALS (NumPy): factors from the HOSVD leading vectors (random columns beyond a mode's
    size), then alternating least squares with Khatri–Rao products."""
    factors = []
    for m in range(t.ndim):
        u, _, _ = _svd(_unfold(t, m))
        f = u[:, :rank]
        if f.shape[1] < rank:
            f = np.concatenate([f, rng.standard_normal((t.shape[m], rank - f.shape[1])) / math.sqrt(t.shape[m])],
                               axis=1)
        factors.append(f)
    for _ in range(iterations):
        for m in range(t.ndim):
            rest = [factors[j] for j in range(t.ndim) if j != m]
            kr = rest[0]
            for f in rest[1:]:
                kr = np.einsum("ir,jr->ijr", kr, f).reshape(-1, rank)
            gram = np.ones((rank, rank))
            for f in rest:
                gram *= f.T @ f
            rhs = _unfold(t, m) @ kr
            factors[m] = np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    weights = np.prod(norms, axis=0)
    safe = [np.where(n > 0, n, 1.0) for n in norms]
    return weights, [f / s for f, s in zip(factors, safe, strict=True)]


def _cp(t: np.ndarray, rank: int, use_tensorly: bool, iterations: int,
        rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """CP of ``t``: weights ``λ`` (shape ``(rank,)``) and unit-norm factors ``(d_m, rank)``."""
    if t.ndim == 2:  # the truncated SVD is the optimal rank-r CP of a matrix
        u, s, vt = _svd(t)
        return np.concatenate([s[:rank], np.zeros(max(0, rank - s.size))]), [_pad_columns(u, rank),
                                                                              _pad_columns(vt.T, rank)]
    if use_tensorly:
        import tensorly as tl
        from tensorly.decomposition import parafac

        with tl.backend_context("numpy"):
            weights, factors = parafac(t, rank, n_iter_max=iterations, init="svd", normalize_factors=True,
                                       random_state=int(rng.integers(2**31)))
        return np.asarray(weights, dtype=np.float64), [np.asarray(f, dtype=np.float64) for f in factors]
    return _cp_als(t, rank, iterations, rng)


def _unit_init(split: SplitPlan, t: np.ndarray, use_tensorly: bool, iterations: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Local parameters (``core``/``weights``/``factor{m}``/``dense``) of one split fitted to ``t``."""
    if split.kind == "dense":
        return {"dense": t}
    ranks = split.ranks
    if split.kind == "tucker":
        core, factors = _tucker(t, ranks, split.fixed_modes, use_tensorly, iterations)
        out = {"core": core}
        out.update({f"factor{m}": f for m, f in enumerate(factors) if f is not None})
        return out
    weights, factors = _cp(t, ranks[0], use_tensorly, iterations, rng)
    if split.kind == "cp":
        return {"weights": weights, **{f"factor{m}": f for m, f in enumerate(factors)}}
    # identity core: spread |λ|^(1/M) over the factors, the signs into factor 0
    spread = np.abs(weights) ** (1.0 / t.ndim)
    out = {f"factor{m}": f * spread for m, f in enumerate(factors)}
    out["factor0"] = out["factor0"] * np.where(weights < 0, -1.0, 1.0)
    return out


def _nearest_kron(x: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """``x ≈ X_1 ⊗ … ⊗ X_K`` (Van Loan–Pitsianis, one split at a time): the best rank-1 fit of
    the rearranged ``(Π a_m) × (Π b_m)`` matrix for ``X_1`` vs the rest."""
    order = len(shapes[0])
    shapes = [tuple(s) + (1,) * (order - len(s)) for s in shapes]
    parts = []
    rest = x.reshape(kron_shape(shapes))
    for k in range(len(shapes) - 1):
        a = shapes[k]
        b = kron_shape(shapes[k + 1:])
        inter = rest.reshape(tuple(d for pair in zip(a, b, strict=True) for d in pair))
        perm = list(range(0, 2 * order, 2)) + list(range(1, 2 * order, 2))
        matrix = inter.transpose(perm).reshape(math.prod(a), math.prod(b))
        u, s, vt = _svd(matrix)
        root = math.sqrt(s[0]) if s.size else 0.0
        parts.append((u[:, 0] * root).reshape(a))
        rest = (vt[0] * root).reshape(b)
    parts.append(rest)
    return parts


def _group_targets(plan: SuperLoRA, targets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each group's target before the fixed projection: ``z_g`` with ``F_g(z_g) ≈ y_g``."""
    cfg = plan.config
    outputs = plan.grouping.from_targets(list(targets))
    if plan.global_shuffle:
        merged = plan.projection(None).adjoint(np.concatenate(outputs))  # exact inverse
        return plan.grouping.split(merged)
    zs = []
    for g, y in enumerate(outputs):
        op = plan.group_projection(g) if cfg.layout == "fold" else None
        if op is None:
            zs.append(y)
            continue
        z = op.adjoint(y)
        fz = op.apply(z)
        denom = float(np.vdot(fz, fz))
        zs.append(z * (float(np.vdot(fz, y)) / denom if denom > 0 else 0.0))  # exact for a Shuffle
    return zs


def decomposition_init(plan: SuperLoRA, targets: Sequence[np.ndarray], seed: int, decomposer: str,
                        iterations: int) -> dict[str, np.ndarray]:
    use_tensorly = _tensorly_available(decomposer)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    random = plan.init(seed, np, np.float64, zero=False)
    for group, z in zip(plan.groups, _group_targets(plan, targets), strict=True):
        if group.scale == 0:
            out.update({n: v for n, v in random.items() if parse_param_name(n)[0] == group.index})
            continue
        out.update(_group_init(plan, group, np.asarray(z, dtype=np.float64) / group.scale, use_tensorly,
                               iterations, rng, random))
    return out


def _group_init(plan: SuperLoRA, group: GroupPlan, z: np.ndarray, use_tensorly: bool, iterations: int,
                rng: np.random.Generator, random: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    total = math.prod(group.shape)
    flat = z.reshape(-1)
    if flat.size < total:
        flat = np.concatenate([flat, np.zeros(total - flat.size)])
    x = flat.reshape(group.shape)
    if len(group.splits) == 1:
        parts = [x]
    elif plan.config.unit == "hadamard":
        parts = [x, np.ones(group.splits[1].shape)]
    else:
        parts = _nearest_kron(x, [s.shape for s in group.splits])
    out = {}
    for k, (split, part) in enumerate(zip(group.splits, parts, strict=True), start=1):
        local = _unit_init(split, part.reshape(split.shape), use_tensorly, iterations, rng)
        if plan.config.unit == "hadamard" and k == 2:
            # the all-ones split has rank 1: small random columns beyond it avoid a saddle point
            for name, value in local.items():
                noise = random[param_name(group.index, k, name)] * 1e-3
                local[name] = np.where(value == 0, noise, value)
        out.update({param_name(group.index, k, name): value for name, value in local.items()})
    return out


def random_init(plan: SuperLoRA, targets: Sequence[np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Every block random; one block per group scaled so ``‖ΔW‖_F`` matches the targets'."""
    params = plan.init(seed, np, np.float64, zero=False)
    norm_delta = math.sqrt(sum(float(np.vdot(d, d)) for d in plan.delta(params)))
    norm_target = math.sqrt(sum(float(np.vdot(t, t)) for t in targets))
    if norm_delta > 0:
        for group in plan.groups:  # ΔW is linear in each block: scale split 1's first block
            name = next(n for n in params if parse_param_name(n)[:2] == (group.index, 1))
            params[name] = params[name] * (norm_target / norm_delta)
    return params
