r"""GLoRA (Chavan et al., "One-for-All: Generalized LoRA"): the layer algebra, framework-free.

A GLoRA layer re-parameterises a frozen linear layer ``f(x) = W0 x + b0`` (``W0`` of shape
``(o, n)``: out × in) with five *support tensors* ``A, B, C, D, E`` (docs/math.md D14 and
§7, the semantics of the official code, with elementwise products)::

    W' = W0 + W0 ⊙ A + B                   (o, n)
    b' = b0 + b0 ⊙ D + E + W0 · C          (o,)      C is an (n, 1) column, W0·C is (o,)
    f'(x) = W' x + b'                      (zero inference overhead after merging)

Each support tensor takes one of a few *forms* per layer; the per-layer choice is a
:class:`~tensoradapt.glora.config.LayerChoice` and all of them are generated from one set of stored
tensors (the "supernet") with **weight entanglement**: a LoRA form of rank ``r' ≤ r`` uses the
first ``r'`` columns/rows of the stored factors, the vector form the first column and the scalar
form the ``[0, 0]`` entry.

=====  ===========================  ==========================  ==================  =============
T      stored tensors (init)        ``lora`` (rank r')          ``vector``          ``scalar``
=====  ===========================  ==========================  ==================  =============
A      ``A_d (o, r)`` 0, ``A_u``    ``A_d[:, :r'] @ A_u[:r']``  ``A_d[:, 0:1]``     ``A_d[0, 0]``
B      ``B_d (o, r)`` 0, ``B_u``    ``B_d[:, :r'] @ B_u[:r']``  ``B_d[:, 0:1]``     ``B_d[0, 0]``
C      ``C_d (n, r)`` 0, ``C_u``    ``C_d[:, :r'] @ C_u[:r']``  ``C_d[:, 0:1]``     —
D      ``D (o,)`` 0                 —                           ``D``               ``D[0]``
E      ``E (o,)`` 0                 —                           ``E``               ``E[0]``
=====  ===========================  ==========================  ==================  =============

(``A_u, B_u (r, n)``, ``C_u (r, 1)``; every tensor may also be ``"none"``, i.e. 0.)  Vector forms
of A and B are ``(o, 1)`` columns broadcast along each row (``A`` scales row ``i`` of ``W0``, ``B``
adds ``β_i`` to it); scalar forms broadcast over every entry.

The ``*_u`` factors are xavier-uniform, everything else starts at zero, so ``W' = W0`` and
``b' = b0`` at step 0 for every choice.  On a bias-free layer (``b0`` absent) ``D`` is meaningless
and excluded (it is not stored and must be ``"none"``); ``C`` and ``E`` still apply, so the
adapted layer gains a bias.

Functions: :func:`parameter_shapes` and :func:`init` (the stored tensors), :func:`weight_bias`
(``W'`` and ``b'``), :func:`vjp` (its analytic VJP), :func:`count_params` (active parameters of a
choice) and :func:`count_stored_params` (the supernet's storage).

Note that LyCORIS's "GLoRA" (``ΔW = W0 A1 A2 + B1 B2`` with matrix products, no bias terms) is a
different method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import buffers
from .._backend import check_floating, compat_namespace, device_of, from_host, namespace
from .._validate import check_int
from .config import TENSORS, LayerChoice, check_bias

__all__ = [
    "count_params",
    "count_stored_params",
    "init",
    "parameter_shapes",
    "vjp",
    "weight_bias",
]


# ---------------------------------------------------------------------------------- counts
def parameter_shapes(o: int, n: int, r: int, *, has_bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored (supernet) tensors of one layer.

    Returns
    -------
    dict
        ``A_d (o, r)``, ``A_u (r, n)``, ``B_d (o, r)``, ``B_u (r, n)``, ``C_d (n, r)``,
        ``C_u (r, 1)``, ``D (o,)`` (only when ``has_bias``), ``E (o,)``.
    """
    o = check_int("o", o, minimum=1)
    n = check_int("n", n, minimum=1)
    r = check_int("r", r, minimum=1)
    shapes: dict[str, tuple[int, ...]] = {
        "A_d": (o, r), "A_u": (r, n), "B_d": (o, r), "B_u": (r, n), "C_d": (n, r), "C_u": (r, 1),
    }
    if has_bias:
        shapes["D"] = (o,)
    shapes["E"] = (o,)
    return shapes


def count_stored_params(o: int, n: int, r: int, *, has_bias: bool = True) -> int:
    """Stored supernet parameters of one layer: ``2r(o+n) + nr + r + 2o`` (``o`` less without bias).

    >>> count_stored_params(2304, 768, 4)
    32260
    """
    return sum(math.prod(s) for s in parameter_shapes(o, n, r, has_bias=has_bias).values())


def count_params(o: int, n: int, choice: LayerChoice | Mapping[str, Any], *, has_bias: bool = True,
                 r: int | None = None) -> int:
    """Active parameters of one layer configuration (docs/math.md §7.2).

    ``A``/``B``: LoRA ``r'(o+n)``, vector ``o``, scalar 1; ``C``: LoRA ``r'(n+1)``, vector ``n``;
    ``D``/``E``: vector ``o``, scalar 1; none 0.

    Parameters
    ----------
    o, n : int
        Output and input features of the layer.
    choice : LayerChoice or mapping
    has_bias : bool
        Whether the base layer has a bias (``D`` must be ``"none"`` otherwise).
    r : int, optional
        Supernet rank, used when ``choice.rank`` is ``None`` and a tensor is LoRA.

    Examples
    --------
    >>> count_params(768, 768, LayerChoice(A="vector", B="lora", D="scalar", E="vector", rank=4))
    7681
    """
    o = check_int("o", o, minimum=1)
    n = check_int("n", n, minimum=1)
    choice = LayerChoice.from_dict(choice)
    check_bias(choice, has_bias)
    q = choice.rank
    if choice.uses_lora and q is None:
        if r is None:
            raise ValueError(f"choice {choice} uses LoRA with rank=None (the supernet rank): pass r")
        q = check_int("r", r, minimum=1)
    elif choice.uses_lora and r is not None and q > check_int("r", r, minimum=1):
        raise ValueError(f"choice {choice} has LoRA rank {q} > the supernet rank r={r} (a sampled rank "
                         "uses the first r' of the supernet's r columns)")
    counts = {
        "A": {"lora": (q or 0) * (o + n), "vector": o, "scalar": 1, "none": 0},
        "C": {"lora": (q or 0) * (n + 1), "vector": n, "none": 0},
        "D": {"vector": o, "scalar": 1, "none": 0},
    }
    counts["B"] = counts["A"]
    counts["E"] = counts["D"]
    return sum(counts[t][getattr(choice, t)] for t in TENSORS)


# ---------------------------------------------------------------------------------- init
def _xavier_uniform(shape: tuple[int, int], seed: int, layer: int, purpose: str) -> np.ndarray:
    """Xavier/Glorot uniform ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))`` with torch's fans for
    a 2-D ``(rows, cols)`` tensor (``fan_out = rows``, ``fan_in = cols``), from raw PCG64 words."""
    size = math.prod(shape)
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    words = buffers.raw_bits(size, seed, layer, purpose)
    unit = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1), exact
    return ((2.0 * unit - 1.0) * bound).astype(np.float32).reshape(shape)


def init(o: int, n: int, r: int, *, has_bias: bool = True, seed: int = 0, layer: int = 0,
         xp: Any = None, dtype: Any = None, device: Any = None) -> dict[str, Any]:
    """Initial stored tensors of one layer: ``*_d``, ``D``, ``E`` zero; ``A_u, B_u, C_u`` xavier-uniform.

    The random values come from :func:`tensoradapt.buffers.raw_bits` with ``(seed, layer,
    "glora.A_u" | "glora.B_u" | "glora.C_u")``, are rounded to float32 on the host and then moved
    to the backend, so the same ``(seed, layer)`` gives bit-identical tensors everywhere.  Because
    every ``*_d`` is zero, ``W' = W0`` and ``b' = b0`` for **every** :class:`LayerChoice`.

    Parameters
    ----------
    o, n, r : int
        Output features, input features, supernet rank.
    has_bias : bool
        Without a bias ``D`` is not stored.
    seed, layer : int
        Seed and layer index (non-negative).
    xp : module, optional
        Array library (default NumPy).
    dtype, device : optional
        Default ``xp.float32``; backend-specific device.

    Returns
    -------
    dict of str to array
        Keys and shapes of :func:`parameter_shapes`.
    """
    shapes = parameter_shapes(o, n, r, has_bias=has_bias)
    seed = check_int("seed", seed, minimum=0)
    layer = check_int("layer", layer, minimum=0)
    space = compat_namespace(xp)
    dtype = dtype if dtype is not None else space.float32
    out = {}
    for name, shape in shapes.items():
        if name.endswith("_u"):
            host = _xavier_uniform(shape, seed, layer, "glora." + name)
        else:
            host = np.zeros(shape, dtype=np.float32)
        out[name] = from_host(space, host, dtype=dtype, device=device)
    return out


# ---------------------------------------------------------------------------------- forward / VJP
def _check_inputs(W0: Any, b0: Any, params: Mapping[str, Any], choice: Any,
                  extra: Mapping[str, Any] | None = None) -> tuple[Any, LayerChoice, int, int, int]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of name -> array, got {type(params).__name__}")
    choice = LayerChoice.from_dict(choice)
    arrays = {"W0": W0, "b0": b0, **{f"params[{k!r}]": v for k, v in params.items()}, **(extra or {})}
    xp = namespace(**arrays)
    check_floating(xp, list(arrays.items()))
    if W0.ndim != 2:
        raise ValueError(f"W0 must be a 2-D (out, in) matrix, got shape {tuple(W0.shape)}")
    o, n = (int(d) for d in W0.shape)
    has_bias = b0 is not None
    if has_bias and tuple(b0.shape) != (o,):
        raise ValueError(f"b0 must have shape (o,) = {(o,)} to match W0 {(o, n)}, got {tuple(b0.shape)}")
    check_bias(choice, has_bias)
    if "A_d" not in params:
        raise ValueError(f"params must hold the stored GLoRA tensors {list(parameter_shapes(o, n, 1))}, "
                         f"got keys {sorted(params)}")
    r = int(params["A_d"].shape[-1])
    expected = parameter_shapes(o, n, r, has_bias=has_bias)
    missing = sorted(set(expected) - set(params))
    extra_keys = sorted(set(params) - set(expected) - {"D"})
    if missing or extra_keys:
        raise ValueError(f"params do not match a layer of shape {(o, n)}{'' if has_bias else ' without bias'}: "
                         f"missing {missing}, unexpected {extra_keys}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape} for W0 {(o, n)} and r={r}, "
                             f"got {tuple(params[name].shape)}")
    return xp, choice.resolve(r), o, n, r


def _support(xp: Any, form: str, down: Any, up: Any, q: int | None) -> Any:
    """The support tensor of one A/B/C form: ``(rows, cols)`` for lora, ``(rows, 1)`` for vector,
    a 0-d array for scalar (``None`` for none)."""
    if form == "lora":
        return xp.matmul(down[:, :q], up[:q, :])
    if form == "vector":
        return down[:, 0:1]
    if form == "scalar":
        return down[0, 0]
    return None


def weight_bias(W0: Any, b0: Any | None, params: Mapping[str, Any],
                choice: LayerChoice | Mapping[str, Any]) -> tuple[Any, Any | None]:
    r"""The merged weight and bias of a GLoRA layer.

    .. math::

        W' = W_0 + W_0 \odot A + B, \qquad b' = b_0 + b_0 \odot D + E + W_0 C

    with the support tensors generated from the stored ``params`` by ``choice`` (module table),
    broadcasting vector forms over columns and scalar forms over every entry.

    Parameters
    ----------
    W0 : array, shape (o, n)
        Frozen base weight (out × in).
    b0 : array of shape (o,), or None
        Frozen base bias; ``None`` for a bias-free layer (then ``choice.D`` must be ``"none"``).
    params : mapping of str to array
        Stored tensors (:func:`parameter_shapes`); all arrays share one library and dtype.
    choice : LayerChoice
        The layer configuration (``rank=None`` means the stored rank ``r``).

    Returns
    -------
    W' : array, shape (o, n)
    b' : array of shape (o,), or None
        ``None`` only when ``b0`` is ``None`` and both ``C`` and ``E`` are ``"none"``.

    Examples
    --------
    The hand-computed vector of docs/math.md §7.2:

    >>> import numpy as np
    >>> p = init(2, 2, 1, xp=np, dtype=np.float64)
    >>> p["A_d"][:, 0] = [0.5, 2.0]; p["B_d"][0, 0] = 0.1; p["C_d"][:, 0] = [1.0, 0.0]
    >>> p["D"][0] = 2.0; p["E"][:] = [0.0, 1.0]
    >>> W, b = weight_bias(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0]), p,
    ...                    LayerChoice(A="vector", B="scalar", C="vector", D="scalar", E="vector"))
    >>> W.round(12).tolist(), b.tolist()
    ([[1.6, 3.1], [9.1, 12.1]], [4.0, 1.0])
    """
    xp, choice, o, _, _ = _check_inputs(W0, b0, params, choice)
    q = choice.rank
    W = W0
    A = _support(xp, choice.A, params["A_d"], params["A_u"], q)
    if A is not None:
        W = W + W0 * A
    B = _support(xp, choice.B, params["B_d"], params["B_u"], q)
    if B is not None:
        W = W + B
    bias = b0
    if choice.D != "none":
        D = params["D"] if choice.D == "vector" else params["D"][0]
        bias = bias + b0 * D
    if choice.E != "none":
        E = params["E"] if choice.E == "vector" else params["E"][0]
        if bias is None:  # bias-free layer: E creates the bias (broadcast a scalar E to (o,))
            bias = xp.zeros((o,), dtype=W0.dtype, device=device_of(W0))
        bias = bias + E
    C = _support(xp, choice.C, params["C_d"], params["C_u"], q)
    if C is not None:
        WC = xp.reshape(xp.matmul(W0, C), (o,))
        bias = WC if bias is None else bias + WC
    if W is W0:
        W = xp.asarray(W0, copy=True)  # never alias the frozen input
    if bias is not None and bias is b0:
        bias = xp.asarray(b0, copy=True)
    return W, bias


def _grad_factor(xp: Any, form: str, G: Any, down: Any, up: Any, q: int | None) -> tuple[Any, Any]:
    """Gradients of the stored ``down (rows, r)`` and ``up (r, cols)`` given ``G = ∂L/∂support`` of shape
    ``(rows, cols)``; zero outside the entangled slice."""
    g_down = xp.zeros(down.shape, dtype=down.dtype, device=device_of(down))
    g_up = xp.zeros(up.shape, dtype=up.dtype, device=device_of(up))
    if form == "lora":
        g_down[:, :q] = xp.matmul(G, up[:q, :].T)
        g_up[:q, :] = xp.matmul(down[:, :q].T, G)
    elif form == "vector":
        g_down[:, 0] = xp.sum(G, axis=1)
    elif form == "scalar":
        g_down[0, 0] = xp.sum(G)
    return g_down, g_up


def vjp(W0: Any, b0: Any | None, params: Mapping[str, Any], choice: LayerChoice | Mapping[str, Any],
        W_bar: Any, b_bar: Any | None, *, include_base: bool = False) -> dict[str, Any]:
    r"""Vector–Jacobian product of :func:`weight_bias` with respect to the stored tensors.

    With ``W̄ = ∂L/∂W'`` and ``b̄ = ∂L/∂b'``:
    ``∂L/∂A = W0 ⊙ W̄``, ``∂L/∂B = W̄``, ``∂L/∂C = W0ᵀ b̄``, ``∂L/∂D = b0 ⊙ b̄``, ``∂L/∂E = b̄``;
    vector forms sum over the broadcast columns, scalar forms over every entry, and LoRA forms
    chain into their factors: ``∂L/∂X_d[:, :r'] = G X_u[:r']ᵀ``, ``∂L/∂X_u[:r'] = X_d[:, :r']ᵀ G``.
    Entries outside the entangled slice, and tensors whose form is ``"none"``, get zero gradient.
    With ``include_base=True`` the gradients of the (normally frozen) base tensors are added:
    ``∂L/∂W0 = W̄ ⊙ (1 + A) + b̄ Cᵀ`` and ``∂L/∂b0 = b̄ ⊙ (1 + D)``.

    Parameters
    ----------
    W0, b0, params, choice
        As for :func:`weight_bias`.
    W_bar : array, shape (o, n)
        Cotangent of ``W'``.
    b_bar : array of shape (o,), or None
        Cotangent of ``b'``; ``None`` means zero (e.g. when ``b'`` is ``None``).

    include_base : bool
        Also return ``"W0"`` and (when ``b0`` is given) ``"b0"``.

    Returns
    -------
    dict of str to array
        One gradient per key of ``params``, each of that tensor's shape (plus ``W0``/``b0``).
    """
    xp, choice, o, n, _ = _check_inputs(W0, b0, params, choice, {"W_bar": W_bar, "b_bar": b_bar})
    if tuple(W_bar.shape) != (o, n):
        raise ValueError(f"W_bar must have the shape of W0 {(o, n)}, got {tuple(W_bar.shape)}")
    if b_bar is not None and tuple(b_bar.shape) != (o,):
        raise ValueError(f"b_bar must have shape (o,) = {(o,)}, got {tuple(b_bar.shape)}")
    q = choice.rank
    grads: dict[str, Any] = {}
    grads["A_d"], grads["A_u"] = _grad_factor(xp, choice.A, W0 * W_bar, params["A_d"], params["A_u"], q)
    grads["B_d"], grads["B_u"] = _grad_factor(xp, choice.B, W_bar, params["B_d"], params["B_u"], q)
    g_c = None
    if b_bar is not None and choice.C != "none":
        g_c = xp.reshape(xp.matmul(W0.T, xp.reshape(b_bar, (o, 1))), (n, 1))
    grads["C_d"], grads["C_u"] = _grad_factor(xp, choice.C if g_c is not None else "none", g_c,
                                              params["C_d"], params["C_u"], q)
    for name, form, g in (("D", choice.D, None if b0 is None or b_bar is None else b0 * b_bar),
                          ("E", choice.E, b_bar)):
        if name not in params:
            continue
        out = xp.zeros(params[name].shape, dtype=params[name].dtype, device=device_of(params[name]))
        if g is not None and form == "vector":
            out = out + g
        elif g is not None and form == "scalar":
            out[0] = xp.sum(g)
        grads[name] = out
    if include_base:
        g_w = W_bar
        A = _support(xp, choice.A, params["A_d"], params["A_u"], q)
        if A is not None:
            g_w = g_w + W_bar * A
        C = _support(xp, choice.C, params["C_d"], params["C_u"], q)
        if C is not None and b_bar is not None:
            g_w = g_w + xp.reshape(b_bar, (o, 1)) * xp.reshape(C, (1, n))
        grads["W0"] = xp.asarray(g_w, copy=True) if g_w is W_bar else g_w
        if b0 is not None:
            g_b = xp.zeros((o,), dtype=b0.dtype, device=device_of(b0)) if b_bar is None else b_bar
            if choice.D != "none" and b_bar is not None:
                g_b = g_b + b_bar * (params["D"] if choice.D == "vector" else params["D"][0])
            grads["b0"] = xp.asarray(g_b, copy=True) if g_b is b_bar else g_b
    return grads
