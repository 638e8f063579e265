"""The exact-form decision (tensoradapt.superlora.forms), without torch: every target it calls
LoRA / LoHa / LoKr has exactly that ΔW from the blocks it names, and the targets it refuses say why."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tensoradapt import SuperLoRA, SuperLoRAConfig, presets
from tensoradapt.superlora import forms
from tensoradapt.superlora.forms import ExactForm, NotExact, exact_form, exact_forms, low_rank_pair
from tensoradapt.superlora.plan import SplitPlan


def _matrix(block, params):
    if block.dense:
        return params[block.names["dense"]]
    L, R = low_rank_pair(block, params)
    assert L.shape == (block.shape[0], block.rank) and R.shape == (block.rank, block.shape[1])
    return L @ R


def _rebuilt(form: ExactForm, params) -> np.ndarray:
    """``ΔW`` from the form alone: ``s · M``, ``s · M1 ⊙ M2`` or ``s · W1 ⊗ W2``."""
    mats = [_matrix(b, params) for b in form.blocks]
    if form.kind == "lora":
        product = mats[0]
    elif form.kind == "loha":
        product = mats[0] * mats[1]
    else:
        product = np.kron(mats[0], mats[1])
    return form.scale * product


def _configs():
    rank = st.integers(1, 4)
    return st.one_of(
        st.builds(presets.lora, rank, st.sampled_from([None, 2.0, 8.0])),
        st.builds(presets.loha, rank, st.sampled_from([None, 4.0])),
        st.builds(presets.lokr, rank, st.sampled_from([-1, 2, 3]), st.booleans(), st.sampled_from([None, 4.0])),
        st.builds(presets.krona, st.sampled_from([-1, 2])),
        st.builds(lambda r, core: SuperLoRAConfig(rank=r, order=2, core=core, fold="matrix"), rank,
                  st.sampled_from(["cp", "tucker", "dense"])),
        st.builds(lambda r, order, splits: SuperLoRAConfig(rank=r, order=order, splits=splits), rank,
                  st.integers(1, 3), st.integers(1, 2)),
        st.builds(lambda r, g: SuperLoRAConfig(rank=r, order=2, fold="matrix", grouping=g), rank, st.integers(1, 3)),
        st.builds(lambda r, p: presets.with_projection(presets.lora(r), p), rank, st.sampled_from(["shuffle",
                                                                                                    "fastfood"])),
        st.builds(lambda r: SuperLoRAConfig(rank=r, layout="stack"), rank),
    )


_shape = st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 9)),
                   st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))


@given(config=_configs(), shapes=st.lists(_shape, min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_every_exact_form_is_the_targets_delta(config, shapes, seed):
    """Property: an ExactForm's blocks rebuild the generator's ΔW of that target (to rounding),
    its factored names are its trainable U, V; a NotExact holds a reason."""
    if config.layout == "stack":
        shapes = [shapes[0]] * len(shapes)
    try:
        plan = SuperLoRA(config, shapes)
    except ValueError:
        assume(False)
    params = plan.init(seed, xp=np, dtype=np.float64)
    deltas = plan.delta(params)
    found = exact_forms(plan)
    assert [f.index for f in found] == list(range(len(shapes)))
    for form, delta, shape in zip(found, deltas, shapes, strict=True):
        if isinstance(form, NotExact):
            assert form.kind is None and form.reason
            continue
        assert form.kind in forms.FORMS
        assert config.projection == "none" and config.layout == "fold"
        assert form.shape == (shape[0], math.prod(shape[1:]))
        np.testing.assert_allclose(_rebuilt(form, params), np.reshape(delta, form.shape), rtol=1e-12, atol=1e-12)
        named = {n for b in form.blocks for n in b.names.values()}
        assert named == set(plan.parameter_shapes([form.group]))
        if form.factored is not None:
            U, V = (params[n] for n in form.factored)
            np.testing.assert_allclose(form.scale * U @ V.T, np.reshape(delta, form.shape), rtol=1e-12, atol=1e-12)


def test_lora_preset_is_factored_lora():
    form = exact_form(SuperLoRA(presets.lora(4, alpha=8.0), [(16, 8), (5, 3)]), 1)
    assert isinstance(form, ExactForm)
    assert (form.kind, form.group, form.shape, form.scale) == ("lora", 1, (5, 3), 2.0)
    assert form.factored == ("g1.split1.factor0", "g1.split1.factor1")
    assert [(b.number, b.rank, b.dense, b.shape) for b in form.blocks] == [(1, 4, False, (5, 3))]


@pytest.mark.parametrize(("core", "rank", "q"), [("cp", 3, 3), ("tucker", (2, 3), 2), ("tucker", (3, 2), 2)])
def test_cp_and_tucker_cores_are_lora_without_factored_path(core, rank, q):
    form = exact_form(SuperLoRA(SuperLoRAConfig(rank=rank, order=2, core=core, fold="matrix"), [(6, 5)]), 0)
    assert form.kind == "lora" and form.factored is None and form.blocks[0].rank == q


def test_a_fixed_identity_factor_is_lora_but_not_factored():
    config = SuperLoRAConfig(rank=3, order=2, core="tucker", fold="matrix", fixed_identity_modes=(1,))
    plan = SuperLoRA(config, [(6, 5)])
    form = exact_form(plan, 0)
    assert form.kind == "lora" and form.factored is None and form.blocks[0].rank == 3
    assert set(form.blocks[0].names) == {"core", "factor0"}
    params = plan.init(1, xp=np, dtype=np.float64)
    np.testing.assert_allclose(_rebuilt(form, params), plan.delta(params)[0], rtol=1e-12)


def test_loha_and_lokr_name_their_blocks():
    loha = exact_form(SuperLoRA(presets.loha(2), [(8, 6)]), 0)
    assert loha.kind == "loha" and loha.factored is None
    assert [(b.shape, b.rank) for b in loha.blocks] == [((8, 6), 2), ((8, 6), 2)]
    lokr = exact_form(SuperLoRA(presets.lokr(1), [(16, 12)]), 0)
    assert lokr.kind == "lokr"
    assert [(b.shape, b.dense, b.rank) for b in lokr.blocks] == [((4, 3), True, None), ((4, 4), False, 1)]
    assert lokr.blocks[0].names == {"dense": "g0.split1.dense"}
    krona = exact_form(SuperLoRA(presets.krona(), [(16, 12)]), 0)
    assert krona.kind == "lokr" and all(b.dense for b in krona.blocks)


@pytest.mark.parametrize(("config", "shapes", "reason"), [
    (presets.with_projection(presets.lora(2), "fastfood"), [(8, 8)], "projection='fastfood' mixes the entries"),
    (presets.with_projection(presets.lora(2), "shuffle"), [(8, 8)], "projection='shuffle' mixes the entries"),
    (SuperLoRAConfig(rank=2, layout="stack"), [(8, 4), (8, 6)], "layout='stack' models several targets"),
    (SuperLoRAConfig(rank=2, grouping=1), [(8, 4), (8, 6)], "its group spans several targets"),
    (presets.lotr(2), [(6, 6), (6, 6)], "its group spans several targets"),
    (SuperLoRAConfig(rank=2, grouping=3), [(8, 4)], "its group spans several targets"),
    (SuperLoRAConfig(rank=2, order=3), [(8, 6)], "its fold (4, 4, 4) is not its own (o, n) = (8, 6)"),
    (SuperLoRAConfig(rank=2, order=3), [(8, 8)], "its structure (identity[4, 4, 4]) is not LoRA"),
    (presets.dense(), [(8, 4)], "its structure (dense[32]) is not LoRA, LoKr or LoHa"),
    (SuperLoRAConfig(rank=1, order=2, fold="matrix", core="dense"), [(8, 4)], "structure (dense[8, 4])"),
    (presets.lonkr(2, 1), [(4, 4)], "structure (identity[2, 2] x identity[2, 2])"),
])
def test_what_is_not_exact_says_why(config, shapes, reason):
    form = exact_form(SuperLoRA(config, shapes), 0)
    assert isinstance(form, NotExact) and form.kind is None and form.index == 0
    assert reason in form.reason


def test_a_tucker_second_block_of_unequal_ranks_is_not_lokr():
    """The formats store LoKr's second block with one rank: a Tucker block of ranks (1, 2) is refused
    (no preset makes one; the plan is edited through its public groups)."""
    plan = SuperLoRA(presets.lokr(1), [(16, 12)])
    group = plan.groups[0]
    first, second = group.splits
    plan.groups = (dataclasses.replace(group, splits=(first, SplitPlan("tucker", second.shape, (1, 2)))),)
    form = exact_form(plan, 0)
    assert isinstance(form, NotExact) and "Tucker product of unequal ranks" in form.reason


def test_arguments_are_checked():
    plan = SuperLoRA(presets.lora(2), [(4, 4)])
    with pytest.raises(TypeError, match="plan must be a SuperLoRA Plan, got dict"):
        exact_form({}, 0)
    with pytest.raises(TypeError, match="plan must be a SuperLoRA Plan"):
        exact_forms(None)
    with pytest.raises(ValueError, match="index must be <= 0, got 1"):
        exact_form(plan, 1)
    with pytest.raises(ValueError, match="index must be >= 0"):
        exact_form(plan, -1)
    with pytest.raises(TypeError, match="index must be an integer, got bool"):
        exact_form(plan, True)
    dense = exact_form(SuperLoRA(presets.krona(), [(16, 12)]), 0).blocks[0]
    with pytest.raises(ValueError, match=r"block 1 is dense \(\(4, 3\)\)"):
        low_rank_pair(dense, {})
    with pytest.raises(KeyError):
        low_rank_pair(exact_form(plan, 0).blocks[0], {})


@given(family=st.sampled_from(["lora", "loha", "lokr", "krona"]), rank=st.integers(1, 4),
       shapes=st.lists(_shape, min_size=1, max_size=3))
def test_every_target_of_a_lora_loha_or_lokr_preset_is_exact(family, rank, shapes):
    """The decision is not conservative: a per-weight LoRA / LoHa / LoKr / KronA preset without a
    projection makes every target exact, in its own family (KronA is LoKr with two dense blocks)."""
    config = presets.krona() if family == "krona" else getattr(presets, family)(rank)
    found = exact_forms(SuperLoRA(config, shapes))
    assert [f.kind for f in found] == ["lokr" if family == "krona" else family] * len(shapes)
    assert [f.group for f in found] == list(range(len(shapes)))
    assert all((f.factored is not None) == (family == "lora") for f in found)
