"""SuperLoRA reduces exactly to the published adapters (docs/math.md §5), each checked against a
reference formula written here independently of the library."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.linalg import hadamard

from tensoradapt import SuperLoRA, SuperLoRAConfig, buffers, factorization, fold_side, presets
from tensoradapt._backend import compat_namespace
from tensoradapt.superlora.plan import param_name
from tensoradapt.testing import assert_reduces_to

VIT_QV = [(768, 768)] * 24


def _targets_from_stream(delta: np.ndarray, target_shapes) -> list[np.ndarray]:
    out, offset = [], 0
    for s in target_shapes:
        size = math.prod(s)
        out.append(delta[offset : offset + size].reshape(s))
        offset += size
    return out


def _group_bounds(total: int, parts: int) -> list[int]:
    sizes = [len(c) for c in np.array_split(np.arange(total), parts)]
    return [0, *np.cumsum(sizes).tolist()]


small_shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4)


@given(target_shapes=small_shapes, parts=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_dense_is_a_free_update(target_shapes, parts, seed) -> None:
    total = sum(a * b for a, b in target_shapes)
    parts = min(parts, total)

    def reference(p):
        return _targets_from_stream(np.concatenate([p[param_name(g, 1, "dense")] for g in range(parts)]),
                                    target_shapes)

    plan = assert_reduces_to(presets.dense(parts), target_shapes, reference, seed=seed)
    assert plan.num_params == total


@given(target_shapes=small_shapes, rank=st.integers(1, 4), alpha=st.sampled_from([None, 1.0, 16.0]),
       seed=st.integers(0, 2**31 - 1))
def test_lora(target_shapes, rank, alpha, seed) -> None:
    scale = 1.0 if alpha is None else alpha / rank

    def reference(p):  # ΔW_i = (α/r) B_i A_i with B = factor0, A = factor1ᵀ
        return [scale * p[param_name(i, 1, "factor0")] @ p[param_name(i, 1, "factor1")].T
                for i in range(len(target_shapes))]

    plan = assert_reduces_to(presets.lora(rank, alpha), target_shapes, reference, seed=seed)
    assert plan.num_params == rank * sum(o + n for o, n in target_shapes)


def test_cubic_fold_on_square_weights_is_lora() -> None:
    shapes = [(6, 6)] * 3
    config = SuperLoRAConfig(rank=2, order=2, core="identity")  # weight-wise, hyper-cubic fold
    assert fold_side(36, 2) == 6

    def reference(p):
        return [p[param_name(i, 1, "factor0")] @ p[param_name(i, 1, "factor1")].T for i in range(3)]

    assert_reduces_to(config, shapes, reference)


@pytest.mark.parametrize(("shape", "factor"), [((768, 768), -1), ((768, 768), 6), ((768, 768), 8),
                                               ((24, 20), -1), ((16, 12), 4), ((7, 10), -1)])
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_lokr(shape, factor, rank) -> None:
    o, n = shape
    (a, c), (b, e) = factorization(o, factor), factorization(n, factor)
    full = rank >= max(c, e) / 2
    alpha = 4.0
    scale = 1.0 if full else alpha / rank

    def reference(p):
        w1 = p["g0.split1.dense"]
        w2 = p["g0.split2.dense"] if full else p["g0.split2.factor0"] @ p["g0.split2.factor1"].T
        assert w1.shape == (a, b) and w2.shape == (c, e)
        return [scale * np.kron(w1, w2)]

    plan = assert_reduces_to(presets.lokr(rank, factor, alpha=alpha), [shape], reference)
    assert plan.num_params == a * b + (c * e if full else rank * (c + e))


def test_lokr_decompose_both_is_the_papers_table1_lokr() -> None:
    def reference(p):
        w1 = p["g0.split1.factor0"] @ p["g0.split1.factor1"].T
        w2 = p["g0.split2.factor0"] @ p["g0.split2.factor1"].T
        return [np.kron(w1, w2)]

    plan = assert_reduces_to(presets.lokr(2, 16, decompose_both=True), [(256, 192)], reference)
    assert plan.groups[0].splits[0].kind == "identity"  # (16, 16): 2 < 16/2, so w1 is factorised


def test_krona() -> None:
    def reference(p):
        return [np.kron(p[param_name(i, 1, "dense")], p[param_name(i, 2, "dense")]) for i in range(2)]

    plan = assert_reduces_to(presets.krona(), [(12, 10), (6, 8)], reference)
    assert plan.num_params == (3 * 2 + 4 * 5) + (2 * 2 + 3 * 4)


@given(target_shapes=small_shapes, rank=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_loha(target_shapes, rank, seed) -> None:
    def reference(p):
        out = []
        for i in range(len(target_shapes)):
            first = p[param_name(i, 1, "factor0")] @ p[param_name(i, 1, "factor1")].T
            second = p[param_name(i, 2, "factor0")] @ p[param_name(i, 2, "factor1")].T
            out.append(first * second)
        return out

    plan = assert_reduces_to(presets.loha(rank), target_shapes, reference, seed=seed)
    assert plan.num_params == 2 * rank * sum(o + n for o, n in target_shapes)


def test_loha_as_a_selection_of_the_kronecker_product() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    big = np.kron(x, y)
    o, n = x.shape
    rows, cols = np.arange(o) * o + np.arange(o), np.arange(n) * n + np.arange(n)
    np.testing.assert_allclose(big[np.ix_(rows, cols)], x * y)


@given(count=st.integers(1, 5), o=st.integers(1, 6), n=st.integers(1, 6), rank=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1), explicit=st.booleans())
def test_lotr(count, o, n, rank, seed, explicit) -> None:
    def reference(p):  # ΔW_s = (σ/r) U G_s Vᵀ with U, V shared by all weights
        u, v, core = p["g0.split1.factor1"], p["g0.split1.factor2"], p["g0.split1.core"]
        return [0.5 * u @ core[s] @ v.T for s in range(count)]

    config = presets.lotr(rank, count if explicit else None, sigma=0.5 * rank)  # S from the shapes when None
    plan = assert_reduces_to(config, [(o, n)] * count, reference, seed=seed)
    assert plan.num_params == count * rank * rank + (o + n) * rank


@pytest.mark.parametrize(("splits", "dense_side"), [(2, None), (3, None), (2, 2), (3, 2), (4, 1)])
def test_lonkr_is_a_kronecker_of_lora_units(splits, dense_side) -> None:
    target_shapes = [(6, 5), (4, 7)]
    total = 58
    side = fold_side(total, 2)

    def reference(p):
        units = []
        for k in range(1, splits + 1):
            if k == 1 and dense_side is not None:
                units.append(p["g0.split1.dense"])
            else:
                units.append(p[param_name(0, k, "factor0")] @ p[param_name(0, k, "factor1")].T)
        product = units[0]
        for unit in units[1:]:
            product = np.kron(product, unit)
        assert product.shape[0] >= side and product.shape[1] >= side
        return _targets_from_stream(product.reshape(-1)[:total], target_shapes)

    assert_reduces_to(presets.lonkr(splits, 2, dense_side, groups=1), target_shapes, reference)


@given(order=st.integers(2, 4), rank=st.integers(1, 3), parts=st.integers(1, 4), target_shapes=small_shapes,
       seed=st.integers(0, 2**31 - 1))
def test_lorta_is_tucker_of_the_cubic_fold(order, rank, parts, target_shapes, seed) -> None:
    total = sum(a * b for a, b in target_shapes)
    parts = min(parts, total)
    bounds = _group_bounds(total, parts)
    letters = "abcde"[:order]

    def reference(p):
        pieces = []
        for g in range(parts):
            size = bounds[g + 1] - bounds[g]
            expr = f"{letters},{','.join(ch.upper() + ch for ch in letters)}->{letters.upper()}"
            factors = [p[param_name(g, 1, f"factor{m}")] for m in range(order)]
            tensor = np.einsum(expr, p[param_name(g, 1, "core")], *factors)
            assert tensor.shape == (fold_side(size, order),) * order
            pieces.append(tensor.reshape(-1)[:size])
        return _targets_from_stream(np.concatenate(pieces), target_shapes)

    assert_reduces_to(presets.lorta(order, rank, parts), target_shapes, reference, seed=seed)


def test_cp_with_unit_weights_equals_identity_core() -> None:
    shapes = [(5, 4)]
    cp = SuperLoRA(presets.lorta(3, 2, 1, core="cp"), shapes)
    ident = SuperLoRA(presets.lorta(3, 2, 1, core="identity"), shapes)
    params = ident.init(1, dtype=np.float64, zero=False)
    with_weights = dict(params, **{"g0.split1.weights": np.ones(2)})
    np.testing.assert_allclose(cp.delta(with_weights)[0], ident.delta(params)[0], rtol=1e-13)


@pytest.mark.parametrize("scope", ["group", "global"])
def test_shuffle_is_a_permutation_of_the_unprojected_update(scope) -> None:
    target_shapes = [(3, 4), (5, 2)]
    base = presets.lorta(2, 2, 2, core="identity")
    shuffled = presets.with_projection(base, "shuffle", scope=scope)
    plain_plan, plan = SuperLoRA(base, target_shapes), SuperLoRA(shuffled, target_shapes)
    params = plan.init(3, dtype=np.float64, zero=False)
    plain = np.concatenate([d.reshape(-1) for d in plain_plan.delta(params)])

    def permutation(n: int, group: int) -> np.ndarray:  # the default generator 2's (docs/math.md D6)
        key = buffers.CounterKey(shuffled.seed, group, "shuffle")
        return buffers.counter_walk_permutation(compat_namespace(np), np.arange(n), key, n)

    def reference(p):
        if scope == "global":
            perm = permutation(22, 2)
            return _targets_from_stream(plain[perm], target_shapes)
        pieces = [plain[lo:hi][permutation(hi - lo, g)] for g, (lo, hi) in enumerate([(0, 11), (11, 22)])]
        return _targets_from_stream(np.concatenate(pieces), target_shapes)

    assert_reduces_to(shuffled, target_shapes, reference, params=params)


def test_fastfood_projection_against_a_dense_matrix() -> None:
    target_shapes = [(4, 5), (3, 4)]
    config = presets.with_projection(presets.lorta(3, 2, 1), "fastfood", 0.4)
    plan = SuperLoRA(config, target_shapes)
    big, n = 32, math.ceil(0.4 * 32)
    assert plan.groups[0].n == n
    # the default generator 2's maps (docs/math.md D6) and its normaliser c = 1/sqrt(N L)
    xp, index = compat_namespace(np), np.arange(32)
    key = {p: buffers.CounterKey(config.seed, 0, "fastfood." + p) for p in ("signs", "permutation", "gaussian")}
    signs = buffers.counter_signs(xp, index, key["signs"], np.float64)
    perm = buffers.counter_permutation(xp, index, key["permutation"], 5)
    gauss = buffers.counter_gaussian(xp, index, key["gaussian"], buffers.gaussian_tables(), np.float32).astype(float)
    h = hadamard(32)
    matrix = (h @ np.diag(gauss) @ np.eye(32)[perm] @ h @ np.diag(signs))[:big, :n] / np.sqrt(big * 32)

    def reference(p):
        factors = [p[param_name(0, 1, f"factor{m}")] for m in range(3)]
        tensor = np.einsum("abc,Aa,Bb,Cc->ABC", p["g0.split1.core"], *factors)
        return _targets_from_stream(matrix @ tensor.reshape(-1)[:n], target_shapes)

    assert_reduces_to(config, target_shapes, reference)


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_lora_with_fastfood_folds_the_reduced_vector_square(ratio) -> None:
    """``fold="matrix"`` with ρ < 1: a rank-r product of the square (d, d) fold of the n_g generated
    entries, cut and mapped by Fastfood to the weight's N entries (docs/superlora.md, projections)."""
    from tensoradapt.ops import Fastfood

    target_shapes = [(6, 8), (5, 7)]
    config = presets.with_projection(presets.lora(2, alpha=4.0), "fastfood", ratio)

    def reference(p):
        out = []
        for i, shape in enumerate(target_shapes):
            size = math.prod(shape)
            n = math.ceil(ratio * size)
            x = p[param_name(i, 1, "factor0")] @ p[param_name(i, 1, "factor1")].T
            assert x.shape == (fold_side(n, 2),) * 2
            op = Fastfood(n, size, config.seed, group=i)
            out.append(2.0 * op.apply(x.reshape(-1)[:n]).reshape(shape))
        return out

    assert_reduces_to(config, target_shapes, reference)


def _projected_count(name: str, ratio: float, shape: tuple[int, int], count: int) -> int:
    """Parameters of ``with_projection(preset, "fastfood", ratio)`` on ``count`` weights of ``shape``,
    by the rule of docs/superlora.md: the §4 count of the preset on the fold of the n_g entries."""
    size = math.prod(shape)
    if name == "lotr":  # one group of S weights, fold (S, d, d)
        n = math.ceil(ratio * size * count)
        d = fold_side(math.ceil(n / count), 2)
        return count * 2 * 2 + 2 * d * 2
    n = math.ceil(ratio * size)
    d = fold_side(n, 2)
    a, c = factorization(d)
    per_weight = {
        "dense": n,
        "lora": 2 * d * 2,
        "loha": 2 * 2 * d * 2,
        "lokr": a * a + (2 * (c + c) if 2 < c / 2 else c * c),
        "krona": a * a + c * c,
        "lorta": 3 * fold_side(n, 3) * 2 + 2**3,
        "lonkr": None,
    }[name]
    if per_weight is None:  # lonkr(2, 2): two identity-core units of side s, s² >= d
        s = fold_side(d, 2)
        per_weight = 2 * (2 * s * 2)
    return count * per_weight


PRESETS = {
    "dense": presets.dense(), "lora": presets.lora(2), "lokr": presets.lokr(2), "krona": presets.krona(),
    "loha": presets.loha(2), "lotr": presets.lotr(2), "lonkr": presets.lonkr(2, 2, groups="weight"),
    "lorta": presets.lorta(3, 2, groups="weight"),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_takes_a_projection(name) -> None:
    """``with_projection`` works on every preset: Fastfood with ρ = 0.5 generates ⌈ρ N_g⌉ entries
    per group (weight-shaped folds become square), a Shuffle (ρ = 1) leaves the count unchanged."""
    from tensoradapt import count_params

    shape, count = (20, 24), 3
    shapes = [shape] * count
    fastfood = presets.with_projection(PRESETS[name], "fastfood", 0.5)
    plan = SuperLoRA(fastfood, shapes)
    assert plan.num_params == _projected_count(name, 0.5, shape, count)
    assert [d.shape for d in plan.delta(plan.init(0, zero=False))] == shapes
    shuffle = presets.with_projection(PRESETS[name], "shuffle", 1)
    assert count_params(shuffle, shapes) == count_params(PRESETS[name], shapes)
    shuffled = SuperLoRA(shuffle, shapes)
    assert [d.shape for d in shuffled.delta(shuffled.init(0, zero=False))] == shapes


def test_one_split_kronecker_is_the_split_itself() -> None:
    config = SuperLoRAConfig(rank=2, order=2, splits=1, grouping=1)

    def reference(p):
        x = p["g0.split1.factor0"] @ p["g0.split1.factor1"].T
        return _targets_from_stream(x.reshape(-1)[:20], [(4, 5)])

    assert_reduces_to(config, [(4, 5)], reference)


def test_stack_layout_is_horizontal_lora() -> None:
    target_shapes = [(4, 3), (4, 5), (6, 2)]
    config = SuperLoRAConfig(rank=2, layout="stack", grouping=[[0, 1], [2]])

    def reference(p):
        first = p["g0.split1.factor0"] @ p["g0.split1.factor1"].T  # (4, 8) = [ΔW_0, ΔW_1]
        second = p["g1.split1.factor0"] @ p["g1.split1.factor1"].T
        return [first[:, :3], first[:, 3:], second]

    plan = assert_reduces_to(config, target_shapes, reference)
    assert plan.num_params == 2 * (4 + 8) + 2 * (6 + 2)


# ---------------------------------------------------------------- worked ViT-Base numbers (docs/math.md §4.1)
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (presets.lora(1), 36_864), (presets.lora(8), 294_912),
        (presets.lorta(3, 1), 727), (presets.lorta(3, 4), 2_968), (presets.lorta(3, 8), 6_320),
        (presets.lorta(4, 4), 1_248), (presets.lorta(5, 4), 1_564), (presets.lorta(5, 8), 33_848),
        (presets.lorta(3, 4, 12), 16_032), (presets.lorta(3, 4, 24), 25_728),
        (presets.lorta(3, 4, 1, "cp"), 2_908), (presets.lorta(3, 4, 1, "identity"), 2_904),
        (presets.lorta(5, 4, 1, "cp"), 544),
        (presets.lotr(1, 24), 1_560), (presets.lotr(2, 24), 3_168), (presets.lotr(8, 24), 13_824),
        (presets.lotr(1), 1_560), (presets.lotr(2), 3_168),
        (presets.lokr(1), 15_360), (presets.lokr(8), 26_112), (presets.lokr(1, 6), 7_008),
        (presets.lokr(4, 6), 25_440), (presets.lokr(1, 10), 6_144),
        (presets.lonkr(2, 1, 6), 1_292), (presets.lonkr(3, 4, 6), 452), (presets.lonkr(4, 1, 6), 90),
        (presets.dense(), 14_155_776),
        (presets.with_projection(presets.dense(1), "fastfood", 0.01), 141_558),
        (presets.with_projection(presets.dense(), "fastfood", 0.01), 141_576),
        (presets.with_projection(presets.lorta(3, 4), "fastfood", 0.01), 700),
        (presets.with_projection(presets.lorta(5, 1), "fastfood", 0.01), 56),
        (presets.with_projection(presets.lorta(3, 4, 4), "fastfood", 0.01), 1_840),
        (SuperLoRAConfig(rank=1, grouping=1), 7_526), (SuperLoRAConfig(rank=1, grouping=12), 26_088),
        (SuperLoRAConfig(rank=1, layout="stack", grouping=1), 19_200),
        (SuperLoRAConfig(rank=1, layout="stack", grouping=12), 27_648),
    ],
)
def test_vit_base_parameter_counts(config, expected) -> None:
    from tensoradapt import count_params

    assert count_params(config, VIT_QV) == expected
