r"""Geometric similarity of two sets of weight updates ``ΔW`` (docs/math.md D15, §8).

For one weight, ``P`` is the update to analyse (e.g. an adapter's ``ΔW_i``) and ``Q`` the
reference (e.g. dense fine-tuning's).  With the thin SVDs ``P = U_P Σ_P V_Pᵀ`` and
``Q = U_Q Σ_Q V_Qᵀ`` (singular values descending)::

    dE = ‖P − Q‖_F / ‖Q‖_F                          relative Euclidean distance (0: equal)
    dL = ‖U_P[:, :k]ᵀ U_Q[:, :k]‖_F² / k             top-k left subspaces  (1: equal, 0: orthogonal)
    dR = ‖V_P[:, :k]ᵀ V_Q[:, :k]‖_F² / k             top-k right subspaces

with ``k = min(k, rank P, rank Q)`` (recorded as ``k_eff``), and the LoRA paper's normalised
subspace similarity ``φ(i, j) = ‖U_P[:, :i]ᵀ U_Q[:, :j]‖_F² / min(i, j)`` (Hu et al. §7).

Singular vectors come from LAPACK (``scipy.linalg.svd`` on NumPy, the array library's own
``linalg.svd`` elsewhere, e.g. CuPy or torch on a GPU) or, for large NumPy matrices, from ARPACK
(``scipy.sparse.linalg.svds``) for the top few only.  Weights with more than two dimensions are
compared as ``(o, n)`` matrices, ``n`` the product of the remaining dimensions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .._backend import check_floating, namespace, to_numpy
from .._validate import check_int

__all__ = [
    "KindSummary",
    "SimilarityRecord",
    "aggregate_by_kind",
    "amplification",
    "compare",
    "compare_pair",
    "infer_kind",
    "phi_grid",
    "subspace_similarity",
    "top_singular",
]

_SIDES = ("left", "right")
_METHODS = ("auto", "full", "svds")
# ``method="auto"`` switches NumPy inputs to ARPACK above this smaller side (a full SVD of a
# 4096 x 4096 matrix costs tens of seconds on two cores; the top 5 vectors well under one).
_SVDS_MIN_SIDE = 2048
# trailing name components that say nothing about which projection a weight belongs to
_GENERIC_COMPONENTS = frozenset({"weight", "bias", "delta", "default", "base_layer", "lora_a", "lora_b"})


# ---------------------------------------------------------------------------------------------
# singular vectors
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Top:
    u: np.ndarray  # (o, k) left singular vectors, descending
    s: np.ndarray  # (k,) singular values
    v: np.ndarray  # (n, k) right singular vectors
    rank: int  # numerical rank among the computed values


def _as_matrix(name: str, x: Any) -> Any:
    """``x`` as a 2-D ``(o, n)`` array in its own namespace (``n`` = product of trailing dims)."""
    xp = namespace(**{name: x})
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (a weight matrix), got shape {tuple(x.shape)}")
    if x.ndim > 2:
        x = xp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))
    check_floating(xp, [(name, x)])
    return x


def _rank_tolerance(shape: tuple[int, ...], dtype: Any) -> float:
    eps = float(np.finfo(np.float64 if np.dtype(dtype).itemsize >= 8 else np.float32).eps)
    return max(shape) * eps


def _numpy_dtype(x: Any) -> np.dtype:
    try:
        return np.dtype(str(x.dtype).rsplit(".", 1)[-1])
    except TypeError:
        return np.dtype(np.float32)


def top_singular(x: Any, k: int, *, method: str = "auto", name: str = "x") -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray, int]:
    r"""Top-``k`` singular triplets of a matrix, on the host.

    Parameters
    ----------
    x : array, shape ``(o, n, …)``
        Any supported backend; more than two dimensions are flattened to ``(o, Π n)``.
    k : int
        Number of leading triplets (clipped to ``min(o, n)``).
    method : {"auto", "full", "svds"}
        ``"full"``: a thin LAPACK SVD (``scipy.linalg.svd`` for NumPy, ``xp.linalg.svd``
        otherwise); ``"svds"``: ARPACK for the top ``k`` only (NumPy; falls back to ``"full"``
        if ARPACK does not converge or ``k`` is too close to ``min(o, n)``); ``"auto"``:
        ``"svds"`` for NumPy matrices whose smaller side is ≥ 2048, else ``"full"``.
    name : str
        Argument name used in error messages.

    Returns
    -------
    u : ndarray, shape ``(o, k)``
    s : ndarray, shape ``(k,)``, descending
    v : ndarray, shape ``(n, k)``
    rank : int
        Numerical rank among the computed values: ``#{σ_j > σ_1 · max(o, n) · ε}``.

    Examples
    --------
    >>> import numpy as np
    >>> u, s, v, rank = top_singular(np.diag([3.0, 2.0, 0.0]), 3)
    >>> s.round(6).tolist(), rank
    ([3.0, 2.0, 0.0], 2)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    k = check_int("k", k, minimum=1)
    x = _as_matrix(name, x)
    o, n = int(x.shape[0]), int(x.shape[1])
    k = min(k, o, n)
    is_numpy = isinstance(x, np.ndarray)
    if method == "auto":
        method = "svds" if is_numpy and min(o, n) >= _SVDS_MIN_SIDE else "full"
    u = s = vt = None
    if method == "svds":
        u, s, vt = _svds(np.asarray(to_numpy(x)), k)
    if u is None:
        if is_numpy:
            import scipy.linalg

            try:
                u, s, vt = scipy.linalg.svd(x, full_matrices=False, check_finite=True)
            except np.linalg.LinAlgError:  # gesdd can fail on hard matrices; gesvd is slower but robust
                u, s, vt = scipy.linalg.svd(x, full_matrices=False, lapack_driver="gesvd")
        else:
            xp = namespace(**{name: x})
            u_, s_, vt_ = xp.linalg.svd(x, full_matrices=False)
            u, s, vt = (np.asarray(to_numpy(a)) for a in (u_[:, :k], s_[:k], vt_[:k, :]))
        u, s, vt = u[:, :k], s[:k], vt[:k, :]
    if not (np.all(np.isfinite(s))):
        raise ValueError(f"{name} has non-finite entries (its singular values are not finite)")
    tol = float(s[0]) * _rank_tolerance((o, n), _numpy_dtype(x)) if s.size else 0.0
    rank = int(np.count_nonzero(s > tol)) if s.size and s[0] > 0 else 0
    return np.asarray(u), np.asarray(s), np.asarray(vt).T, rank


def _svds(x: np.ndarray, k: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """ARPACK top-k SVD with a deterministic start vector; ``(None,)*3`` when it cannot be used."""
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, svds

    if k >= min(x.shape) - 1:
        return None, None, None
    x = np.asarray(x, dtype=np.result_type(x.dtype, np.float32))
    v0 = np.random.default_rng(0).standard_normal(min(x.shape)).astype(x.dtype)
    try:
        u, s, vt = svds(x, k=k, v0=v0, solver="arpack", tol=0)
    except (ArpackNoConvergence, ArpackError):
        return None, None, None
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vt[order, :]


# ---------------------------------------------------------------------------------------------
# LoRA-paper φ
# ---------------------------------------------------------------------------------------------
def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side must be 'left' (column space, U) or 'right' (row space, V), got {side!r}")


def phi_grid(P: Any, Q: Any, max_i: int = 8, max_j: int = 8, side: str = "right", *,
             method: str = "auto") -> np.ndarray:
    r"""The LoRA paper's normalised subspace similarity for every ``i ≤ max_i``, ``j ≤ max_j``.

    .. math:: φ(i, j) = \frac{\| (U_P^{i})^\top U_Q^{j} \|_F^2}{\min(i, j)} \in [0, 1]

    where ``U^i`` are the first ``i`` left (``side="left"``) or right (``side="right"``, the
    LoRA paper's choice for ``A``) singular vectors.  ``φ = 1`` when one top subspace contains
    the other, ``0`` when they are orthogonal; invariant to signs and rotations within the
    subspaces.

    Parameters
    ----------
    P, Q : arrays, shapes ``(o, n)`` (or more dims, flattened after the first)
        Any supported backend; the shapes may differ on the side not compared.
    max_i, max_j : int
        Grid size (clipped to the available singular vectors).
    side : {"left", "right"}
    method : str
        See :func:`top_singular`.

    Returns
    -------
    ndarray, shape ``(max_i, max_j)``
        ``grid[i - 1, j - 1] = φ(i, j)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((6, 5))
    >>> np.allclose(phi_grid(A, -2 * A, 3, 3), 1.0)
    True
    """
    _check_side(side)
    max_i = check_int("max_i", max_i, minimum=1)
    max_j = check_int("max_j", max_j, minimum=1)
    up, _, vp, _ = top_singular(P, max_i, method=method, name="P")
    uq, _, vq, _ = top_singular(Q, max_j, method=method, name="Q")
    a, b = (up, uq) if side == "left" else (vp, vq)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"P and Q must have the same number of {'rows' if side == 'left' else 'columns'} "
                         f"to compare their {side} singular vectors, got {a.shape[0]} and {b.shape[0]}")
    overlap = (a.T.astype(np.float64) @ b.astype(np.float64)) ** 2  # (i, j)
    cumulative = np.cumsum(np.cumsum(overlap, axis=0), axis=1)
    i = np.arange(1, cumulative.shape[0] + 1)[:, None]
    j = np.arange(1, cumulative.shape[1] + 1)[None, :]
    return np.clip(cumulative / np.minimum(i, j), 0.0, 1.0)


def subspace_similarity(P: Any, Q: Any, i: int, j: int, side: str = "right", *, method: str = "auto") -> float:
    r"""``φ(i, j) = ‖(U_P^i)ᵀ U_Q^j‖_F² / min(i, j)`` for one pair (see :func:`phi_grid`).

    Examples
    --------
    >>> import numpy as np
    >>> P = np.eye(4)[:, :2] @ np.ones((2, 3))      # column space span(e1, e2)
    >>> Q = np.eye(4)[:, 2:] @ np.ones((2, 3))      # column space span(e3, e4)
    >>> round(subspace_similarity(P, Q, 1, 1, "left"), 12), round(subspace_similarity(P, P, 1, 1, "left"), 12)
    (0.0, 1.0)
    """
    i = check_int("i", i, minimum=1)
    j = check_int("j", j, minimum=1)
    grid = phi_grid(P, Q, i, j, side, method=method)
    return float(grid[min(i, grid.shape[0]) - 1, min(j, grid.shape[1]) - 1])


# ---------------------------------------------------------------------------------------------
# dE, dL, dR
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimilarityRecord:
    """dE/dL/dR of one weight (docs/math.md §8.2).

    Attributes
    ----------
    name, kind : str
        The weight's name and its kind (see :func:`infer_kind`).
    shape : tuple of int
    dE, dE_abs : float
        ``‖P − Q‖_F / ‖Q‖_F`` (``inf`` if ``Q = 0 ≠ P``, ``0`` if both vanish) and ``‖P − Q‖_F``.
    dL, dR : float
        Top-``k_eff`` left / right subspace similarity (``nan`` when ``k_eff = 0``).
    k_eff : int
        ``min(k, rank P, rank Q)``.
    norm_P, norm_Q : float
        ``‖P‖_F`` and ``‖Q‖_F``.
    paired : bool
        Whether dL/dR are the paired cosines ``(1/k) Σ_j |⟨u_{P,j}, u_{Q,j}⟩|``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dE: float
    dE_abs: float
    dL: float
    dR: float
    k_eff: int
    norm_P: float
    norm_Q: float
    paired: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


def infer_kind(name: str) -> str:
    """The kind of a weight from its name: the last component that is not generic.

    Generic components (``weight``, ``bias``, ``default``, ``base_layer``, ``lora_A``/``lora_B``,
    ``delta``) and layer indices are skipped.

    Examples
    --------
    >>> infer_kind("encoder.layer.3.attention.self.query.weight")
    'query'
    >>> infer_kind("transformer.h.0.attn.c_attn.weight")
    'c_attn'
    >>> infer_kind("7")
    '7'
    """
    parts = [p for p in re.split(r"[./]", str(name)) if p]
    for part in reversed(parts):
        if part.lower() not in _GENERIC_COMPONENTS and not part.isdigit():
            return part
    return parts[-1] if parts else str(name)


def _frobenius(x: Any) -> float:
    """``‖x‖_F`` without overflow or underflow: in float64, scaled by ``max |x|`` (as LAPACK's nrm2)."""
    xp = namespace(x=x)
    x = xp.astype(x, xp.float64)
    if math.prod(x.shape) == 0:
        return 0.0
    peak = float(xp.max(xp.abs(x)))
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    scaled = x / peak
    return peak * float(xp.sqrt(xp.sum(scaled * scaled)))


def _overlap(a: np.ndarray, b: np.ndarray, k: int, paired: bool) -> float:
    if k == 0:
        return math.nan
    a = a[:, :k].astype(np.float64)
    b = b[:, :k].astype(np.float64)
    if paired:
        return float(np.clip(np.mean(np.abs(np.sum(a * b, axis=0))), 0.0, 1.0))
    return float(np.clip(np.sum((a.T @ b) ** 2) / k, 0.0, 1.0))


def compare_pair(P: Any, Q: Any, *, name: str = "", kind: str | None = None, k: int = 5,
                 paired: bool = False, method: str = "auto") -> SimilarityRecord:
    r"""dE, dL, dR of one pair (``P`` analysed against the reference ``Q``); see :func:`compare`."""
    k = check_int("k", k, minimum=1)
    P = _as_matrix("P", P)
    Q = _as_matrix("Q", Q)
    namespace(P=P, Q=Q)
    if tuple(P.shape) != tuple(Q.shape):
        raise ValueError(f"P and Q must have the same shape, got {tuple(P.shape)} and {tuple(Q.shape)}"
                         + (f" for {name!r}" if name else ""))
    if P.dtype != Q.dtype:
        raise TypeError(f"P and Q must share a dtype, got {P.dtype} and {Q.dtype}"
                        + (f" for {name!r}" if name else ""))
    diff = _frobenius(P - Q)
    norm_p, norm_q = _frobenius(P), _frobenius(Q)
    if norm_q > 0:
        de = diff / norm_q
    else:
        de = 0.0 if diff == 0 else math.inf
    up, _, vp, rank_p = top_singular(P, k, method=method, name="P")
    uq, _, vq, rank_q = top_singular(Q, k, method=method, name="Q")
    k_eff = min(k, rank_p, rank_q)
    return SimilarityRecord(
        name=name, kind=kind if kind is not None else infer_kind(name), shape=tuple(int(d) for d in P.shape),
        dE=de, dE_abs=diff, dL=_overlap(up, uq, k_eff, paired), dR=_overlap(vp, vq, k_eff, paired),
        k_eff=k_eff, norm_P=norm_p, norm_Q=norm_q, paired=paired,
    )


def compare(P_list: Sequence[Any], Q_list: Sequence[Any], names: Sequence[str] | None = None, k: int = 5,
            kinds: Sequence[str] | None = None, *, paired: bool = False, method: str = "auto",
            progress: Any = None) -> list[SimilarityRecord]:
    r"""Per-weight geometric similarity of ``P_list`` (analysed) against ``Q_list`` (reference).

    For each pair ``(P, Q)`` (docs/math.md D15, §8.2):

    .. math::

        dE = \frac{\|P - Q\|_F}{\|Q\|_F}, \qquad
        dL = \frac{\|U_{P,k}^\top U_{Q,k}\|_F^2}{k}, \qquad
        dR = \frac{\|V_{P,k}^\top V_{Q,k}\|_F^2}{k}

    with ``k = k_eff = min(k, rank P, rank Q)``.  Converging to the reference means
    ``dE → 0`` and ``dL, dR → 1``.  With ``paired=True``, dL and dR are the paired cosines
    ``(1/k) Σ_{j ≤ k} |⟨u_{P,j}, u_{Q,j}⟩|`` instead (sensitive to the order of the vectors).

    Parameters
    ----------
    P_list, Q_list : sequences of arrays, shapes ``(o_i, n_i, …)``
        Matching weights (same shape pairwise); any supported backend.
    names : sequence of str, optional
        Weight names (default ``"0"``, ``"1"``, …).
    k : int
        Number of leading singular vectors (default 5).
    kinds : sequence of str, optional
        The kind of every weight (default :func:`infer_kind` of its name).
    paired : bool
        Use paired cosines instead of the subspace overlap.
    method : {"auto", "full", "svds"}
        SVD method (:func:`top_singular`).
    progress : callable, optional
        Wraps the iterable of pairs (e.g. ``tqdm.tqdm``) to show progress.

    Returns
    -------
    list of SimilarityRecord

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> Q = [rng.standard_normal((8, 6)) for _ in range(2)]
    >>> recs = compare(Q, Q, names=["l0.query.weight", "l0.value.weight"])
    >>> [(r.kind, r.dE, round(r.dL, 12), round(r.dR, 12), r.k_eff) for r in recs]
    [('query', 0.0, 1.0, 1.0, 5), ('value', 0.0, 1.0, 1.0, 5)]
    """
    P_list, Q_list = list(P_list), list(Q_list)
    if len(P_list) != len(Q_list):
        raise ValueError(f"P_list and Q_list must have the same length, got {len(P_list)} and {len(Q_list)}")
    names = [str(i) for i in range(len(P_list))] if names is None else [str(n) for n in names]
    if len(names) != len(P_list):
        raise ValueError(f"names has {len(names)} entries but there are {len(P_list)} weights")
    if kinds is not None:
        kinds = [str(kd) for kd in kinds]
        if len(kinds) != len(P_list):
            raise ValueError(f"kinds has {len(kinds)} entries but there are {len(P_list)} weights")
    items: Iterable[int] = range(len(P_list))
    if progress is not None:
        items = progress(items)
    return [compare_pair(P_list[i], Q_list[i], name=names[i], kind=None if kinds is None else kinds[i],
                         k=k, paired=paired, method=method) for i in items]


@dataclass(frozen=True)
class KindSummary:
    """Means of dE/dL/dR over the weights of one kind (NaN entries are skipped)."""

    kind: str
    count: int
    dE: float
    dL: float
    dR: float
    dE_abs: float


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def aggregate_by_kind(records: Iterable[SimilarityRecord]) -> dict[str, KindSummary]:
    """Mean dE, dL, dR per weight kind (e.g. ``query`` vs ``value``), kinds in first-seen order.

    Examples
    --------
    >>> import numpy as np
    >>> Q = [np.eye(3), 2 * np.eye(3)]
    >>> summary = aggregate_by_kind(compare([np.zeros((3, 3))] * 2, Q, names=["a.query", "b.query"]))
    >>> summary["query"].count, summary["query"].dE
    (2, 1.0)
    """
    groups: dict[str, list[SimilarityRecord]] = {}
    for record in records:
        groups.setdefault(record.kind, []).append(record)
    return {
        kind: KindSummary(kind, len(recs), _nanmean([r.dE for r in recs]), _nanmean([r.dL for r in recs]),
                          _nanmean([r.dR for r in recs]), _nanmean([r.dE_abs for r in recs]))
        for kind, recs in groups.items()
    }


def amplification(delta: Any, weight: Any, r: int, *, method: str = "auto") -> tuple[float, float]:
    r"""The LoRA paper's ``ΔW`` vs ``W`` analysis (Hu et al. §7.3).

    With ``U, V`` the top-``r`` left/right singular vectors of ``ΔW``, returns
    ``(‖Uᵀ W V‖_F, ‖ΔW‖_F / ‖Uᵀ W V‖_F)``: how much of ``W`` lies in ``ΔW``'s top directions,
    and the amplification factor (``inf`` if the projection vanishes).

    Examples
    --------
    >>> import numpy as np
    >>> proj, amp = amplification(np.diag([2.0, 0, 0]), np.eye(3), 1)
    >>> round(proj, 12), round(amp, 12)
    (1.0, 2.0)
    """
    r = check_int("r", r, minimum=1)
    delta = _as_matrix("delta", delta)
    weight = _as_matrix("weight", weight)
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"delta and weight must have the same shape, got {tuple(delta.shape)} and "
                         f"{tuple(weight.shape)}")
    u, _, v, _ = top_singular(delta, r, method=method, name="delta")
    w = np.asarray(to_numpy(weight), dtype=np.float64)
    projected = float(np.linalg.norm(u.T.astype(np.float64) @ w @ v.astype(np.float64)))
    norm_delta = _frobenius(delta)
    return projected, (norm_delta / projected if projected > 0 else math.inf)
