"""GLoRA core: config and choices, the hand vector, a direct reference, init, VJPs, parameter counts."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensoradapt._backend import namespace
from tensoradapt.glora import (
    CHOICES,
    GLoRAConfig,
    LayerChoice,
    count_params,
    count_stored_params,
    evolve,
    init,
    largest_choice,
    parameter_shapes,
    search_space,
    vjp,
    weight_bias,
)

from .conftest import check_vjp_by_finite_differences, inner, np_

HAND_CHOICE = LayerChoice(A="vector", B="scalar", C="vector", D="scalar", E="vector")


def _random_params(o, n, r, *, has_bias=True, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in parameter_shapes(o, n, r, has_bias=has_bias).items()}


def _direct(W0, b0, p, choice, r):
    """Reference: the support tensors built entry by entry with explicit loops (docs/math.md §7.2)."""
    o, n = W0.shape
    q = choice.rank if choice.rank is not None else r

    def support(form, down, up, rows, cols):
        S = np.zeros((rows, cols))
        for i in range(rows):
            for j in range(cols):
                if form == "lora":
                    S[i, j] = sum(down[i, k] * up[k, j] for k in range(q))
                elif form == "vector":
                    S[i, j] = down[i, 0]
                elif form == "scalar":
                    S[i, j] = down[0, 0]
        return S

    A = support(choice.A, p["A_d"], p["A_u"], o, n)
    B = support(choice.B, p["B_d"], p["B_u"], o, n)
    C = support(choice.C, p["C_d"], p["C_u"], n, 1)[:, 0]
    D = {"vector": p.get("D"), "scalar": None if "D" not in p else np.full(o, p["D"][0]), "none": np.zeros(o)}
    E = {"vector": p["E"], "scalar": np.full(o, p["E"][0]), "none": np.zeros(o)}[choice.E]
    W = np.empty((o, n))
    b = np.empty(o)
    for i in range(o):
        for j in range(n):
            W[i, j] = W0[i, j] + W0[i, j] * A[i, j] + B[i, j]
        base = 0.0 if b0 is None else b0[i] + b0[i] * D[choice.D][i]
        b[i] = base + E[i] + sum(W0[i, j] * C[j] for j in range(n))
    return W, b


# ---------------------------------------------------------------- choices and config
def test_search_space_sizes() -> None:
    space = search_space()
    assert len(space) == 432 == 4 * 4 * 3 * 3 * 3
    assert len(set(space)) == 432
    assert len(search_space(has_bias=False)) == 4 * 4 * 3 * 1 * 3
    assert all(c.D == "none" for c in search_space(has_bias=False))
    # several ranks: every LoRA-using choice once per rank
    assert len(search_space(GLoRAConfig(rank=8, ranks=(8, 4)))) == 270 * 2 + 162
    restricted = GLoRAConfig(A=("lora", "none"), B=("vector",), C=("none",), D=("scalar", "none"), E=("none",))
    assert len(search_space(restricted)) == 4


def test_layer_choice_normalises() -> None:
    assert LayerChoice(A="constant") == LayerChoice(A="scalar")
    assert LayerChoice(A="vector", rank=3).rank is None  # no LoRA: the rank is irrelevant
    assert LayerChoice(A="lora").resolve(4).rank == 4
    assert LayerChoice(A="lora", rank=2).resolve(4).rank == 2
    choice = LayerChoice(A="lora", B="vector", C="lora", D="scalar", E="none", rank=2)
    assert LayerChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
    assert str(choice) == "A=lora B=vector C=lora D=scalar E=none r'=2"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"A": "full"}, ValueError, r"A must be one of \('lora', 'vector', 'scalar', 'none'\), got 'full'"),
        ({"C": "scalar"}, ValueError, r"C must be one of \('lora', 'vector', 'none'\), got 'scalar'"),
        ({"D": "lora"}, ValueError, r"D must be one of \('vector', 'scalar', 'none'\), got 'lora'"),
        ({"E": 1}, TypeError, "E must be one of"),
        ({"A": "lora", "rank": 0}, ValueError, r"rank \(the LoRA rank r'\) must be >= 1, got 0"),
        ({"A": "lora", "rank": 1.5}, TypeError, r"rank \(the LoRA rank r'\) must be an integer, got float 1.5"),
        ({"A": "lora", "rank": True}, TypeError, "rank .* must be an integer, got bool True"),
    ],
)
def test_layer_choice_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        LayerChoice(**kwargs)


def test_rank_above_supernet_rank_is_refused() -> None:
    with pytest.raises(ValueError, match=r"LoRA rank r'=5 exceeds the supernet rank r=4"):
        LayerChoice(B="lora", rank=5).resolve(4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank \(the supernet rank r\) must be >= 1, got 0"),
        ({"ranks": (5,)}, r"ranks must be .* integers in \[1, rank=4\]"),
        ({"ranks": ()}, "ranks must be a non-empty sequence"),
        ({"A": ("lora", "full")}, "A must be one of"),
        ({"C": ()}, "C must offer at least one form"),
        ({"ranks": (0,)}, r"ranks\[0\] must be >= 1, got 0"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_config_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GLoRAConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": "4"}, r"rank \(the supernet rank r\) must be an integer, got str '4'"),
        ({"rank": 4.0}, "rank .* must be an integer, got float 4.0"),
        ({"ranks": (2, 1.0)}, r"ranks\[1\] must be an integer, got float 1.0"),
        ({"ranks": "2"}, r"ranks\[0\] must be an integer, got str '2'"),
        ({"seed": True}, "seed must be an integer, got bool True"),
        ({"A": 3}, "A must be a sequence of forms"),
    ],
)
def test_config_type_errors(kwargs, match) -> None:
    """Non-integers are a TypeError, integers out of range a ValueError (tensoradapt._validate.check_int)."""
    with pytest.raises(TypeError, match=match):
        GLoRAConfig(**kwargs)


def test_numpy_integers_are_accepted_and_normalised() -> None:
    config = GLoRAConfig(rank=np.int64(4), ranks=np.array([2, 4]), seed=np.int32(1))
    assert config == GLoRAConfig(rank=4, ranks=(4, 2), seed=1)
    assert type(config.rank) is int and all(type(q) is int for q in config.ranks) and type(config.seed) is int
    assert type(LayerChoice(A="lora", rank=np.int64(2)).rank) is int
    assert GLoRAConfig(rank=8, ranks=4).ranks == (4,)  # one rank


def test_config_round_trip_and_defaults() -> None:
    config = GLoRAConfig(rank=8, ranks=[4, 8], A=["lora", "constant"], seed=3)
    assert config.ranks == (8, 4) and config.A == ("lora", "scalar")
    assert GLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert GLoRAConfig().ranks == (4,)
    assert {t: getattr(GLoRAConfig(), t) for t in "ABCDE"} == CHOICES
    with pytest.raises(ValueError, match="config_version 2 is not supported"):
        GLoRAConfig.from_dict({**config.to_dict(), "config_version": 2})
    with pytest.raises(ValueError, match=r"unknown GLoRAConfig fields \['alpha'\]"):
        GLoRAConfig.from_dict({"alpha": 1})


def test_largest_choice() -> None:
    assert largest_choice() == LayerChoice("lora", "lora", "lora", "vector", "vector", rank=4)
    assert largest_choice(has_bias=False).D == "none"
    assert largest_choice(GLoRAConfig(rank=8, ranks=(2, 4), A=("none", "scalar"))) == \
        LayerChoice("scalar", "lora", "lora", "vector", "vector", rank=4)


# ---------------------------------------------------------------- forward
def test_hand_vector(backend) -> None:
    """docs/math.md §7.2: W0=[[1,2],[3,4]], b0=[1,-1], A vector [0.5,2], B scalar 0.1, C vector [1,0],
    D scalar 2, E vector [0,1] -> W'=[[1.6,3.1],[9.1,12.1]], b'=[4,1]."""
    p = {k: np.zeros(s) for k, s in parameter_shapes(2, 2, 2).items()}
    p["A_d"][:, 0] = [0.5, 2.0]
    p["A_d"][:, 1] = [7.0, 7.0]  # outside the vector slice: ignored
    p["B_d"][0, 0] = 0.1
    p["C_d"][:, 0] = [1.0, 0.0]
    p["D"][:] = [2.0, 5.0]  # scalar form reads D[0] only
    p["E"][:] = [0.0, 1.0]
    W0, b0 = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0])
    W, b = weight_bias(backend(W0), backend(b0), {k: backend(v) for k, v in p.items()}, HAND_CHOICE)
    np.testing.assert_allclose(np_(W), [[1.6, 3.1], [9.1, 12.1]], rtol=1e-15)
    np.testing.assert_allclose(np_(b), [4.0, 1.0], rtol=1e-15)
    x = np.array([0.3, -2.0])
    unmerged = W0 @ x + (W0 * np.array([[0.5], [2.0]])) @ x + 0.1 * x.sum() + \
        b0 + 2.0 * b0 + np.array([0.0, 1.0]) + W0 @ np.array([1.0, 0.0])
    np.testing.assert_allclose(np_(W) @ x + np_(b), unmerged, rtol=1e-14)


def test_every_choice_against_direct_reference() -> None:
    o, n, r = 3, 4, 3
    rng = np.random.default_rng(1)
    W0, b0 = rng.standard_normal((o, n)), rng.standard_normal(o)
    p = _random_params(o, n, r, seed=2)
    space = search_space(GLoRAConfig(rank=r, ranks=(3, 1)))
    for choice in space:
        W, b = weight_bias(W0, b0, p, choice)
        W_ref, b_ref = _direct(W0, b0, p, choice, r)
        np.testing.assert_allclose(W, W_ref, rtol=1e-12, atol=1e-12, err_msg=str(choice))
        np.testing.assert_allclose(b, b_ref, rtol=1e-12, atol=1e-12, err_msg=str(choice))


def test_bias_free_layer() -> None:
    o, n, r = 3, 2, 2
    rng = np.random.default_rng(3)
    W0 = rng.standard_normal((o, n))
    p = _random_params(o, n, r, has_bias=False)
    assert "D" not in p
    W, b = weight_bias(W0, None, p, LayerChoice(A="lora", B="vector"))
    assert b is None
    np.testing.assert_allclose(W, _direct(W0, None, p, LayerChoice(A="lora", B="vector", rank=r), r)[0])
    for choice in (LayerChoice(E="scalar"), LayerChoice(C="lora"), LayerChoice(C="vector", E="vector")):
        _, b = weight_bias(W0, None, p, choice)
        np.testing.assert_allclose(b, _direct(W0, None, p, choice.resolve(r), r)[1], rtol=1e-13)
    with pytest.raises(ValueError, match=r"D='vector' on a bias-free layer: .* must be 'none'"):
        weight_bias(W0, None, p, LayerChoice(D="vector"))


def test_random_cases_on_backends(backend) -> None:
    o, n, r = 4, 3, 2
    rng = np.random.default_rng(4)
    W0, b0 = rng.standard_normal((o, n)), rng.standard_normal(o)
    p = _random_params(o, n, r, seed=5)
    for seed in range(6):
        choice = search_space(GLoRAConfig(rank=r, ranks=(1, 2)))[int(np.random.default_rng(seed).integers(432))]
        W, b = weight_bias(backend(W0), backend(b0), {k: backend(v) for k, v in p.items()}, choice)
        W_ref, b_ref = _direct(W0, b0, p, choice, r)
        np.testing.assert_allclose(np_(W), W_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np_(b), b_ref, rtol=1e-12, atol=1e-12)


def test_outputs_never_alias_inputs() -> None:
    W0, b0 = np.ones((2, 2)), np.ones(2)
    W, b = weight_bias(W0, b0, _random_params(2, 2, 1), LayerChoice())
    W[0, 0] = 5.0
    b[0] = 5.0
    assert W0[0, 0] == 1.0 and b0[0] == 1.0


def test_input_validation() -> None:
    W0, b0 = np.ones((3, 2)), np.ones(3)
    p = _random_params(3, 2, 2)
    with pytest.raises(ValueError, match=r"b0 must have shape \(o,\) = \(3,\)"):
        weight_bias(W0, np.ones(2), p, LayerChoice())
    with pytest.raises(ValueError, match=r"params\['A_u'\] must have shape \(2, 2\)"):
        weight_bias(W0, b0, {**p, "A_u": np.ones((2, 3))}, LayerChoice())
    with pytest.raises(ValueError, match=r"missing \['E'\]"):
        weight_bias(W0, b0, {k: v for k, v in p.items() if k != "E"}, LayerChoice())
    with pytest.raises(TypeError, match="must share a dtype"):
        weight_bias(W0.astype(np.float32), b0, p, LayerChoice())
    with pytest.raises(ValueError, match=r"r'=3 exceeds the supernet rank r=2"):
        weight_bias(W0, b0, p, LayerChoice(A="lora", rank=3))
    with pytest.raises(TypeError, match="choice must be a LayerChoice"):
        weight_bias(W0, b0, p, "lora")


# ---------------------------------------------------------------- init
def test_init_is_a_no_op_for_every_choice() -> None:
    o, n, r = 3, 5, 4
    rng = np.random.default_rng(6)
    W0, b0 = rng.standard_normal((o, n)).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    p = init(o, n, r, seed=1, layer=2)
    for choice in search_space():
        W, b = weight_bias(W0, b0, p, choice)
        assert np.array_equal(W, W0) and np.array_equal(b, b0), choice
    bias_free = init(o, n, r, has_bias=False)
    for choice in search_space(has_bias=False):
        W, b = weight_bias(W0, None, bias_free, choice)
        assert np.array_equal(W, W0)
        assert b is None or not np.any(b)


def test_init_values(backend) -> None:
    o, n, r = 6, 10, 4
    host = init(o, n, r, seed=7, layer=3)
    assert {k: v.shape for k, v in host.items()} == parameter_shapes(o, n, r)
    assert all(v.dtype == np.float32 for v in host.values())
    for k in ("A_d", "B_d", "C_d", "D", "E"):
        assert not np.any(host[k])
    for k, bound in (("A_u", np.sqrt(6 / (r + n))), ("B_u", np.sqrt(6 / (r + n))), ("C_u", np.sqrt(6 / (r + 1)))):
        assert np.all(np.abs(host[k]) <= bound) and np.std(host[k]) > 0
    assert not np.array_equal(host["A_u"], host["B_u"])
    assert not np.array_equal(host["A_u"], init(o, n, r, seed=7, layer=4)["A_u"])
    xp = namespace(x=backend(np.zeros(1)))
    moved = init(o, n, r, seed=7, layer=3, xp=xp)
    for k, v in host.items():
        assert np.array_equal(np_(moved[k]), v)  # bit-identical on every backend


# ---------------------------------------------------------------- VJP
FD_CHOICES = [
    LayerChoice("lora", "lora", "lora", "vector", "vector"),
    LayerChoice("lora", "lora", "lora", "vector", "vector", rank=1),
    HAND_CHOICE,
    LayerChoice("scalar", "vector", "none", "scalar", "scalar"),
    LayerChoice("none", "scalar", "lora", "none", "none", rank=2),
]


@pytest.mark.parametrize("choice", FD_CHOICES, ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
def test_vjp_by_finite_differences(backend, choice, has_bias) -> None:
    if not has_bias:
        choice = choice.replace(D="none")
    o, n, r = 4, 3, 3
    rng = np.random.default_rng(8)
    W0 = rng.standard_normal((o, n))
    b0 = rng.standard_normal(o) if has_bias else None
    p = _random_params(o, n, r, has_bias=has_bias, seed=9)
    names = list(p)
    W_bar, b_bar = rng.standard_normal((o, n)), rng.standard_normal(o)

    def forward(values):
        params = dict(zip(names, values, strict=True))
        W, b = weight_bias(backend(W0), None if b0 is None else backend(b0), params, choice)
        return [W, b if b is not None else backend(np.zeros(o))]

    grads = vjp(backend(W0), None if b0 is None else backend(b0), {k: backend(v) for k, v in p.items()},
                      choice, backend(W_bar), backend(b_bar))
    assert list(grads) == names
    check_vjp_by_finite_differences(backend, forward, [p[k] for k in names], [W_bar, b_bar],
                                    [grads[k] for k in names])


def test_vjp_zero_outside_the_entangled_slice() -> None:
    o, n, r = 5, 4, 4
    rng = np.random.default_rng(10)
    W0, b0 = rng.standard_normal((o, n)), rng.standard_normal(o)
    p = _random_params(o, n, r)
    W_bar, b_bar = rng.standard_normal((o, n)), rng.standard_normal(o)
    g = vjp(W0, b0, p, LayerChoice("lora", "vector", "lora", "scalar", "none", rank=2), W_bar, b_bar)
    assert np.all(g["A_d"][:, :2] != 0) and not np.any(g["A_d"][:, 2:])
    assert np.all(g["A_u"][:2] != 0) and not np.any(g["A_u"][2:])
    assert np.all(g["B_d"][:, 0] != 0) and not np.any(g["B_d"][:, 1:]) and not np.any(g["B_u"])
    assert not np.any(g["C_d"][:, 2:]) and not np.any(g["C_u"][2:])
    assert g["D"][0] != 0 and not np.any(g["D"][1:])
    assert not np.any(g["E"])
    np.testing.assert_allclose(g["B_d"][:, 0], W_bar.sum(axis=1))
    np.testing.assert_allclose(g["D"][0], np.sum(b0 * b_bar))


def test_vjp_without_bias_cotangent() -> None:
    o, n, r = 3, 3, 2
    rng = np.random.default_rng(11)
    W0 = rng.standard_normal((o, n))
    p = _random_params(o, n, r, has_bias=False)
    g = vjp(W0, None, p, LayerChoice(A="lora", C="lora", E="vector"), rng.standard_normal((o, n)), None)
    assert not np.any(g["C_d"]) and not np.any(g["E"]) and np.any(g["A_d"])


@st.composite
def _cases(draw):
    o = draw(st.integers(1, 5))
    n = draw(st.integers(1, 5))
    r = draw(st.integers(1, 4))
    has_bias = draw(st.booleans())
    forms = {t: draw(st.sampled_from(CHOICES[t])) for t in "ABCDE"}
    if not has_bias:
        forms["D"] = "none"
    rank = draw(st.integers(1, r))
    return o, n, r, has_bias, LayerChoice(**forms, rank=rank), draw(st.integers(0, 2**32 - 1))


@given(_cases())
def test_vjp_adjoint_identity(case) -> None:
    """W', b' are polynomials of degree <= 2 in the stored tensors and of degree 1 in (W0, b0), so
    a central difference along either set is exact for any step:
    <(f(θ+δ) - f(θ-δ))/2, (W̄, b̄)> = <δ, vjp(W̄, b̄)>."""
    o, n, r, has_bias, choice, seed = case
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((o, n))
    b0 = rng.standard_normal(o) if has_bias else None
    p = _random_params(o, n, r, has_bias=has_bias, seed=seed + 1)
    W_bar, b_bar = rng.standard_normal((o, n)), rng.standard_normal(o)
    grads = vjp(W0, b0, p, choice, W_bar, b_bar, include_base=True)
    dp = {k: rng.standard_normal(v.shape) for k, v in p.items()}
    dW0 = rng.standard_normal((o, n))
    db0 = rng.standard_normal(o) if has_bias else None

    def pairing(sign_p, sign_base):
        W, b = weight_bias(W0 + sign_base * dW0, None if b0 is None else b0 + sign_base * db0,
                                 {k: v + sign_p * dp[k] for k, v in p.items()}, choice)
        return inner(W, W_bar) + (0.0 if b is None else inner(b, b_bar))

    for lhs, rhs in (
        ((pairing(1.0, 0.0) - pairing(-1.0, 0.0)) / 2, sum(inner(grads[k], dp[k]) for k in p)),
        ((pairing(0.0, 1.0) - pairing(0.0, -1.0)) / 2,
         inner(grads["W0"], dW0) + (inner(grads["b0"], db0) if has_bias else 0.0)),
    ):
        assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs), abs(rhs))


# ---------------------------------------------------------------- parameter counts
def test_param_count_spec_example() -> None:
    choice = LayerChoice(A="vector", B="lora", C="none", D="scalar", E="vector", rank=4)
    assert count_params(768, 768, choice) == 768 + 6144 + 0 + 1 + 768 == 7681
    assert count_params(768, 768, choice.replace(rank=None), r=4) == 7681
    with pytest.raises(ValueError, match=r"rank=None .* pass r"):
        count_params(768, 768, choice.replace(rank=None))
    with pytest.raises(ValueError, match="bias-free layer"):
        count_params(768, 768, choice, has_bias=False)


def test_param_counts_vit_base() -> None:
    """docs/math.md §4.1 ViT-B numbers: 12 blocks of qkv, proj, fc1, fc2 at r = 4."""
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    stored = [count_stored_params(o, n, 4) for o, n in shapes]
    assert stored == [32260, 16900, 39940, 44548]
    assert 12 * sum(stored) == 1_603_776
    largest = largest_choice()
    assert 12 * sum(count_params(o, n, largest) for o, n in shapes) == 1_603_776
    vector = LayerChoice("vector", "vector", "vector", "vector", "vector")
    assert 12 * sum(count_params(o, n, vector) for o, n in shapes) == 396_288
    assert count_stored_params(5, 3, 2, has_bias=False) == count_stored_params(5, 3, 2) - 5


def test_param_count_equals_entries_that_receive_gradient() -> None:
    """For random parameters and cotangents, exactly the active entries get a non-zero gradient."""
    o, n, r = 4, 3, 3
    rng = np.random.default_rng(12)
    W0, b0 = rng.standard_normal((o, n)), rng.standard_normal(o)
    p = _random_params(o, n, r)
    W_bar, b_bar = rng.standard_normal((o, n)), rng.standard_normal(o)
    for choice in itertools.islice(search_space(GLoRAConfig(rank=r, ranks=(3, 2))), 0, None, 7):
        grads = vjp(W0, b0, p, choice, W_bar, b_bar)
        active = sum(int(np.count_nonzero(g)) for g in grads.values())
        assert active == count_params(o, n, choice), choice


# ---------------------------------------------------------------- evolutionary search (framework-free)
def _synthetic(seed: int = 0, layers: int = 4, choices: int = 6):
    """Per-layer spaces of labelled choices with random counts and an additive random score table."""
    rng = np.random.default_rng(seed)
    spaces = [tuple(f"L{li}c{i}" for i in range(choices)) for li in range(layers)]
    counts = [[int(c) for c in rng.integers(0, 20, size=choices)] for _ in range(layers)]
    value = {c: float(v) + 0.05 * n for space, row in zip(spaces, counts, strict=True)
             for c, v, n in zip(space, rng.uniform(0, 1, size=choices), row, strict=True)}  # bigger tends to win
    cost = {c: n for space, row in zip(spaces, counts, strict=True) for c, n in zip(space, row, strict=True)}
    return spaces, counts, value, cost


def _best_by_brute_force(spaces, value, cost, low, high):
    feasible = [combo for combo in itertools.product(*spaces) if low <= sum(cost[c] for c in combo) <= high]
    return max(feasible, key=lambda combo: sum(value[c] for c in combo))


def test_evolve_finds_the_best_feasible_individual_and_respects_the_budget() -> None:
    spaces, counts, value, cost = _synthetic()
    low, high = 15, 35
    best = _best_by_brute_force(spaces, value, cost, low, high)
    unconstrained = tuple(max(space, key=value.__getitem__) for space in spaces)
    assert sum(cost[c] for c in unconstrained) > high  # the budget binds
    seen = []

    def evaluate(configs) -> float:
        assert isinstance(configs, tuple) and len(configs) == len(spaces)
        assert low <= sum(cost[c] for c in configs) <= high, "an infeasible individual was evaluated"
        seen.append(configs)
        return sum(value[c] for c in configs)

    result = evolve(spaces, counts, evaluate, high, min_params=low, population=30, top_k=5, iterations=10,
                    seed=0, progress=False)
    assert result.configs == best
    assert result.score == pytest.approx(sum(value[c] for c in best))
    assert result.num_params == sum(cost[c] for c in best)
    assert len(seen) == len(set(seen)) == result.evaluations  # cached: no individual twice
    assert result.target_names == ("0", "1", "2", "3")
    assert len(result.history) == 11 and [r.iteration for r in result.history] == list(range(11))
    scores = [r.best_score for r in result.history]
    assert scores == sorted(scores) and scores[-1] == result.score
    assert all(low <= r.best_params <= high for r in result.history)
    summary = json.loads(json.dumps(result.as_dict()))
    assert summary["configs"] == dict(zip(result.target_names, best, strict=True))


def test_evolve_is_deterministic_for_a_seed() -> None:
    spaces, counts, value, _ = _synthetic(seed=1)

    def run(seed):
        calls = []

        def evaluate(configs):
            calls.append(configs)
            return sum(value[c] for c in configs)

        return evolve(spaces, counts, evaluate, 40, population=12, top_k=4, iterations=4, seed=seed,
                      progress=False), calls

    (r1, c1), (r2, c2), (_, c3) = run(7), run(7), run(8)
    assert r1 == r2 and c1 == c2
    assert c1 != c3


def test_evolve_on_glora_spaces_with_a_numpy_score() -> None:
    """GLoRA spaces and counts, scored by how close W' comes to a target weight (NumPy only)."""
    config = GLoRAConfig(rank=2, C=("none",), D=("none",), E=("none",))
    shapes = [(3, 4), (4, 3)]
    rng = np.random.default_rng(2)
    W0 = [rng.standard_normal(s) for s in shapes]
    params = [{k: rng.standard_normal(v) for k, v in parameter_shapes(o, n, 2, has_bias=False).items()}
              for o, n in shapes]
    spaces = [search_space(config, has_bias=False) for _ in shapes]
    counts = [[count_params(o, n, c, has_bias=False, r=2) for c in space] for (o, n), space in zip(
        shapes, spaces, strict=True)]
    targets = [weight_bias(w, None, p, LayerChoice(A="lora", B="vector"))[0] for w, p in zip(W0, params, strict=True)]

    def evaluate(configs) -> float:
        return -sum(float(np.sum((weight_bias(w, None, p, c)[0] - t) ** 2))
                    for w, p, c, t in zip(W0, params, configs, targets, strict=True))

    budget = 2 * ((3 + 4) * 2 + 4)
    result = evolve(spaces, counts, evaluate, budget, population=20, iterations=5, progress=False)
    assert result.score == 0.0 and result.num_params <= budget
    assert all(c.resolve(2) == LayerChoice(A="lora", B="vector", rank=2) for c in result.configs)


def test_evolve_nan_progress_and_errors(capsys) -> None:
    spaces, counts, _, _ = _synthetic()
    result = evolve(spaces, counts, lambda configs: float("nan"), 40, population=3, iterations=1)
    assert result.score == -math.inf  # NaN counts as the worst score
    assert "GLoRA search" in capsys.readouterr().err

    def failing(configs) -> float:
        raise KeyError("validation set missing")

    with pytest.raises(KeyError, match="validation set missing"):
        evolve(spaces, counts, failing, 40, progress=False)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"evaluate": 0.5}, TypeError, "evaluate must be a callable"),
        ({"max_params": 2.5}, TypeError, "max_params must be an integer, got float 2.5"),
        ({"population": True}, TypeError, "population must be an integer, got bool True"),
        ({"population": 0}, ValueError, "population must be >= 1, got 0"),
        ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
        ({"iterations": -1}, ValueError, "iterations must be >= 0, got -1"),
        ({"mutations": "3"}, TypeError, "mutations must be an integer"),
        ({"crossovers": -2}, ValueError, "crossovers must be >= 0, got -2"),
        ({"seed": -1}, ValueError, "seed must be >= 0, got -1"),
        ({"mutation_prob": 1.5}, ValueError, r"mutation_prob must be a probability in \[0, 1\]"),
        ({"min_params": 50}, ValueError, r"min_params \(50\) must be <= max_params \(40\)"),
        ({"min_params": 79, "max_params": 100}, ValueError, r"no configuration fits the budget \[79, 100\]"),
        ({"counts": [[1, 2]] * 4}, ValueError, r"counts\[0\] must give one count per choice of spaces\[0\] \(6\)"),
        ({"counts": [[1] * 6] * 3}, ValueError, r"one sequence of parameter counts per layer \(4\)"),
        ({"counts": [[1.0] * 6] * 4}, TypeError, r"counts\[0\]\[0\] must be an integer, got float 1.0"),
        ({"counts": [[-1] * 6] * 4}, ValueError, r"counts\[0\]\[0\] must be >= 0, got -1"),
        ({"spaces": [], "counts": []}, TypeError, "spaces must be a non-empty sequence"),
        ({"target_names": ["a"]}, ValueError, r"target_names must name every layer \(4\), got 1"),
    ],
)
def test_evolve_validation(change, error, match) -> None:
    spaces, counts, _, _ = _synthetic()  # counts in [0, 20): every individual costs at most 76
    arguments = {"spaces": spaces, "counts": counts,
                 "evaluate": lambda configs: 0.0, "max_params": 40, "progress": False, **change}
    with pytest.raises(error, match=match):
        evolve(**arguments)


def test_evolve_gives_up_when_random_draws_find_no_feasible_individual() -> None:
    """The budget lies inside the counts' span, but only one individual in 100^8 meets it."""
    spaces = [tuple(range(100))] * 8
    counts = [[1000] + [0] * 99] * 8
    with pytest.raises(ValueError, match=r"no random configuration within the budget .* widen the budget"):
        evolve(spaces, counts, lambda configs: 0.0, 8000, min_params=8000, population=2, progress=False)


def test_search_module_imports_no_framework() -> None:
    code = ("import sys\nimport tensoradapt.glora.search\n"
            "bad = [m for m in ('torch', 'tqdm', 'cupy', 'jax') if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
