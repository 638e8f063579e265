"""GLoRA on PyTorch models: autograd, supernet sampling, merge/unmerge/detach, GPT-2, save/load, search."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tensoradapt.glora import GLoRAConfig, LayerChoice, count_params, largest_choice, search_space
from tensoradapt.torch.glora import (
    GLoRAAdapter,
    GLoRALayer,
    attach_glora,
    search,
    weight_bias,
)


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(),
                         nn.Linear(4, 3)).to(dtype)


def _randomise(adapter: GLoRAAdapter, seed: int = 0, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


# ---------------------------------------------------------------- autograd Function
@pytest.mark.parametrize("choice", [
    LayerChoice("lora", "lora", "lora", "vector", "vector"),
    LayerChoice("vector", "scalar", "vector", "scalar", "vector", rank=None),
    LayerChoice("lora", "none", "lora", "none", "scalar", rank=1),
], ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
def test_gradcheck(choice, has_bias) -> None:
    if not has_bias:
        choice = choice.replace(D="none")
    gen = torch.Generator().manual_seed(0)
    o, n, r = 4, 3, 2
    shapes = {"A_d": (o, r), "A_u": (r, n), "B_d": (o, r), "B_u": (r, n), "C_d": (n, r), "C_u": (r, 1),
              "D": (o,), "E": (o,)}
    if not has_bias:
        del shapes["D"]
    params = {k: torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for k, s in shapes.items()}
    W0 = torch.randn(o, n, generator=gen, dtype=torch.float64, requires_grad=True)
    b0 = torch.randn(o, generator=gen, dtype=torch.float64, requires_grad=True) if has_bias else None
    keys = list(params)

    def f(W0, b0, *values):
        W, b = weight_bias(W0, b0, dict(zip(keys, values, strict=True)), choice)
        return (W, b) if b is not None else (W,)

    assert torch.autograd.gradcheck(f, (W0, b0, *params.values()))


def test_function_matches_autograd_of_the_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    o, n, r = 5, 4, 3
    W0 = torch.randn(o, n, generator=gen)
    b0 = torch.randn(o, generator=gen)
    p = {k: torch.randn(s, generator=gen, requires_grad=True) for k, s in
         {"A_d": (o, r), "A_u": (r, n), "B_d": (o, r), "B_u": (r, n), "C_d": (n, r), "C_u": (r, 1),
          "D": (o,), "E": (o,)}.items()}
    choice = LayerChoice("lora", "vector", "lora", "scalar", "vector", rank=2)
    W, b = weight_bias(W0, b0, p, choice)
    A = p["A_d"][:, :2] @ p["A_u"][:2]
    C = (p["C_d"][:, :2] @ p["C_u"][:2])[:, 0]
    W_ref = W0 + W0 * A + p["B_d"][:, 0:1]
    b_ref = b0 + b0 * p["D"][0] + p["E"] + W0 @ C
    torch.testing.assert_close(W, W_ref)
    torch.testing.assert_close(b, b_ref)
    cot_W, cot_b = torch.randn(o, n, generator=gen), torch.randn(o, generator=gen)
    ours = torch.autograd.grad((W * cot_W).sum() + (b * cot_b).sum(), list(p.values()))
    ref = torch.autograd.grad((W_ref * cot_W).sum() + (b_ref * cot_b).sum(), list(p.values()), allow_unused=True)
    for name, g, h in zip(p, ours, ref, strict=True):
        torch.testing.assert_close(g, torch.zeros_like(g) if h is None else h, msg=name)


# ---------------------------------------------------------------- attach, sampling, init
def test_attach_structure_and_init_is_a_no_op() -> None:
    model = _mlp()
    x = torch.randn(7, 6)
    ref = model(x)
    adapter = attach_glora(model, GLoRAConfig(), ["0", "2", "4"])
    assert isinstance(model[0], GLoRALayer) and model.tensoradapt["default"] is adapter
    assert adapter.target_names == ("0", "2", "4")
    assert adapter.has_bias == (True, False, True)
    assert "D" not in adapter.layers[1]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    assert {id(p) for p in adapter.trainable_parameters()} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    assert adapter.num_stored_params() == sum(p.numel() for p in adapter.parameters())
    model.train()
    for _ in range(5):  # every sampled config is a no-op at init
        assert torch.equal(model(x), ref)
    model.eval()
    assert torch.equal(model(x), ref)
    assert adapter.last_configs == tuple(largest_choice(has_bias=b).resolve(4) for b in adapter.has_bias)


def test_supernet_sampling_is_uniform_per_forward_and_reproducible() -> None:
    def run(seed):
        model = _mlp()
        adapter = attach_glora(model, GLoRAConfig(seed=seed), ["0", "2", "4"])
        _randomise(adapter)
        model.train()
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
        outs, seen = [], []
        for _ in range(40):
            outs.append(model(x))
            seen.append(adapter.last_configs)
        return outs, seen, adapter, model

    outs1, seen1, adapter, model = run(3)
    outs2, seen2, _, _ = run(3)
    _, seen3, _, _ = run(4)
    assert seen1 == seen2 and all(torch.equal(a, b) for a, b in zip(outs1, outs2, strict=True))
    assert seen1 != seen3
    assert len({s[0] for s in seen1}) > 30  # a fresh config on (almost) every call
    for configs in seen1:
        for choice, space in zip(configs, adapter.search_spaces(), strict=True):
            assert choice in space
    assert all(s[1].D == "none" for s in seen1)  # the bias-free layer never samples D
    adapter.reseed(3)  # restarting the sampler replays the same sequence
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    model(x)
    assert adapter.last_configs == seen1[0]


def test_set_configs_fixes_train_and_eval() -> None:
    model = _mlp()
    adapter = attach_glora(model, GLoRAConfig(), ["0", "2", "4"])
    _randomise(adapter)
    x = torch.randn(4, 6)
    choice = LayerChoice(A="lora", B="vector", C="lora", E="scalar", rank=2)
    adapter.set_configs(choice)
    assert adapter.configs == (choice,) * 3
    model.train()
    y1 = model(x)
    assert torch.equal(model(x), y1)
    model.eval()
    assert torch.equal(model(x), y1)
    by_name = {"0": LayerChoice(A="vector"), "2": {"B": "scalar"}, "4": LayerChoice()}
    adapter.set_configs(by_name)
    assert adapter.configs == (LayerChoice(A="vector"), LayerChoice(B="scalar"), LayerChoice())
    assert adapter.active_params() == 5 + 1 + 0
    adapter.set_configs(None)
    assert adapter.configs is None
    with pytest.raises(RuntimeError, match="no configs are fixed"):
        adapter.active_params()
    with pytest.raises(ValueError, match=r"layer '2': D='vector' on a bias-free layer"):
        adapter.set_configs(LayerChoice(D="vector"))
    with pytest.raises(ValueError, match=r"one LayerChoice per adapted layer \(3\), got 2"):
        adapter.set_configs([LayerChoice(), LayerChoice()])
    with pytest.raises(ValueError, match=r"missing \['4'\]"):
        adapter.set_configs({"0": LayerChoice(), "2": LayerChoice()})
    with pytest.raises(ValueError, match=r"layer '0': LoRA rank r'=5 exceeds the supernet rank r=4"):
        adapter.set_configs(LayerChoice(A="lora", rank=5))


def test_training_updates_only_the_active_slices() -> None:
    model = _mlp()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = attach_glora(model, GLoRAConfig(), ["0", "4"])
    choice = LayerChoice(A="lora", B="vector", C="vector", D="scalar", E="vector", rank=2)
    adapter.set_configs(choice)
    before = {k: v.clone() for k, v in adapter.state_tensors().items()}
    optimiser = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    x = torch.randn(8, 6)
    for _ in range(3):
        optimiser.zero_grad()
        model(x).pow(2).sum().backward()
        optimiser.step()
    after = adapter.state_tensors()
    for layer in ("0", "4"):
        assert not torch.equal(after[f"{layer}.A_d"][:, :2], before[f"{layer}.A_d"][:, :2])
        assert torch.equal(after[f"{layer}.A_d"][:, 2:], before[f"{layer}.A_d"][:, 2:])
        assert torch.equal(after[f"{layer}.B_u"], before[f"{layer}.B_u"])
        for name in ("B_d", "C_d", "D", "E"):
            assert not torch.equal(after[f"{layer}.{name}"], before[f"{layer}.{name}"]), name
    adapter.detach()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k])


def test_unfrozen_base_gets_the_exact_gradient() -> None:
    model = _mlp(dtype=torch.float64)
    adapter = attach_glora(model, GLoRAConfig(), ["0"], freeze_base=False)
    _randomise(adapter)
    choice = LayerChoice("lora", "scalar", "lora", "vector", "none", rank=3)
    adapter.set_configs(choice)
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x).sum().backward()
    base = model[0].base_layer
    grad_w, grad_b = base.weight.grad.clone(), base.bias.grad.clone()
    p = {k: v.detach() for k, v in adapter.layers[0].items()}
    W0 = base.weight.detach().clone().requires_grad_(True)
    b0 = base.bias.detach().clone().requires_grad_(True)
    A = p["A_d"][:, :3] @ p["A_u"][:3]
    C = (p["C_d"][:, :3] @ p["C_u"][:3])[:, 0]
    W = W0 + W0 * A + p["B_d"][0, 0]
    b = b0 + b0 * p["D"] + W0 @ C
    rest = model[1:]
    with adapter.disabled():
        rest(torch.nn.functional.linear(x, W, b)).sum().backward()
    torch.testing.assert_close(grad_w, W0.grad)
    torch.testing.assert_close(grad_b, b0.grad)


# ---------------------------------------------------------------- merge / unmerge / detach
def test_every_config_merged_equals_unmerged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4, bias=False))
    x = torch.randn(6, 5)
    adapter = attach_glora(model, GLoRAConfig(rank=2, ranks=(2, 1)), ["0", "1"])
    _randomise(adapter, scale=0.5)
    model.eval()
    spaces = adapter.search_spaces()
    assert len(spaces[0]) == 270 * 2 + 162 and len(search_space()) == 432
    for i, first in enumerate(spaces[0]):
        second = spaces[1][i % len(spaces[1])]
        adapter.set_configs([first, second])
        unmerged = model(x)
        adapter.merge()
        assert adapter.merged and isinstance(model[0], GLoRALayer)  # the wrapper runs x W'ᵀ + b'
        needs_bias = second.C != "none" or second.E != "none"
        assert (model[1].merged_weight_bias[1] is not None) == needs_bias
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
        adapter.unmerge()
        assert isinstance(model[0], GLoRALayer)


def test_merge_unmerge_detach_are_exact() -> None:
    model = _mlp()
    originals = [model[0], model[2], model[4]]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 6)
    adapter = attach_glora(model, GLoRAConfig(), ["0", "2", "4"])
    _randomise(adapter)
    model.eval()
    with pytest.warns(UserWarning, match="merging without fixed configs"):
        adapter.merge()  # the largest choice
    merged_out = model(x)
    adapter.unmerge()
    torch.testing.assert_close(model(x), merged_out, rtol=1e-5, atol=1e-6)
    adapter.set_configs(LayerChoice(A="scalar", B="lora", E="vector"))
    unmerged = model(x)
    adapter.merge()
    assert adapter.merged and model[0].base_layer is originals[0]
    assert model[2].merged_weight_bias[1] is not None  # E made a bias on the bias-free layer
    with pytest.raises(RuntimeError, match="already merged"):
        adapter.merge()
    with pytest.raises(RuntimeError, match="call unmerge"):
        adapter.set_configs(None)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    adapter.unmerge()
    assert torch.equal(model(x), unmerged)
    adapter.merge()
    returned = adapter.detach()  # from the merged state
    assert returned is model and [model[0], model[2], model[4]] == originals
    assert not hasattr(model, "tensoradapt")
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match="detached"):
        adapter.merge()


def test_merge_refuses_non_finite() -> None:
    model = _mlp()
    adapter = attach_glora(model, GLoRAConfig(), ["0"])
    adapter.set_configs(LayerChoice(B="scalar"))
    with torch.no_grad():
        adapter.layers[0]["B_d"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        adapter.merge()
    assert isinstance(model[0], GLoRALayer) and not adapter.merged


def test_merge_and_detach_gives_a_plain_model() -> None:
    model = _mlp()
    x = torch.randn(5, 6)
    adapter = attach_glora(model, GLoRAConfig(), ["0", "2", "4"])
    _randomise(adapter)
    adapter.set_configs(LayerChoice("lora", "lora", "lora", "none", "none"))
    model.eval()
    expected = model(x)
    plain = adapter.merge_and_detach()
    assert plain is model and not hasattr(model, "tensoradapt")
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    assert model[2].bias is not None  # C on the bias-free layer
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_unsupported_targets() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"GLoRA adapts nn\.Linear and transformers' Conv1D .* '0' is a Conv2d"):
        attach_glora(model, GLoRAConfig(), ["0"])
    with pytest.raises(TypeError, match="config must be a GLoRAConfig"):
        attach_glora(model, {"rank": 4}, ["1"])
    with pytest.raises(ValueError, match="matched no module"):
        attach_glora(model, GLoRAConfig(), ["q_proj"])
    attach_glora(model, GLoRAConfig(), ["1"])
    with pytest.raises(RuntimeError, match="module '1' belongs to an attached adapter"):
        attach_glora(model, GLoRAConfig(), ["1"])
    with pytest.raises(RuntimeError, match=r"module '1\.base_layer' belongs to an attached adapter"):
        attach_glora(model, GLoRAConfig(), ["base_layer"])
    two = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    attach_glora(two, GLoRAConfig(), ["0"])
    with pytest.raises(RuntimeError, match="already has an attribute 'tensoradapt'"):
        attach_glora(two, GLoRAConfig(), ["1"])


def test_summary_and_counts() -> None:
    model = _mlp()
    adapter = attach_glora(model, GLoRAConfig(rank=2), ["0", "2", "4"])
    text = adapter.summary()
    assert "GLoRA supernet: rank 2" in text and "supernet (eval: largest)" in text
    assert adapter.num_stored_params() == (2 * 2 * 11 + 6 * 2 + 2 + 2 * 5) + (2 * 2 * 9 + 5 * 2 + 2 + 4) + \
        (2 * 2 * 7 + 4 * 2 + 2 + 2 * 3)
    largest = [largest_choice(adapter.config, has_bias=b) for b in adapter.has_bias]
    assert adapter.active_params(largest) == adapter.num_stored_params()
    adapter.set_configs(LayerChoice(A="vector", B="lora", D="none", E="vector", rank=1))
    assert adapter.active_params() == sum(count_params(o, n, adapter.configs[0], has_bias=b)
                                       for (o, n), b in zip(adapter.shapes, adapter.has_bias, strict=True))
    assert "active params of the fixed configs" in adapter.summary()


# ---------------------------------------------------------------- GPT-2 (Conv1D)
def test_conv1d_layer_matches_the_formula() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs: weight (5, 7)
    holder = nn.Sequential(conv)
    x = torch.randn(2, 3, 5)
    adapter = attach_glora(holder, GLoRAConfig(rank=3), ["0"])
    assert adapter.shapes == ((7, 5),)
    _randomise(adapter)
    choice = LayerChoice("lora", "vector", "lora", "vector", "scalar")
    adapter.set_configs(choice)
    p = {k: v.detach() for k, v in adapter.layers[0].items()}
    W0, b0 = conv.weight.t(), conv.bias
    W = W0 + W0 * (p["A_d"] @ p["A_u"]) + p["B_d"][:, 0:1]
    b = b0 + b0 * p["D"] + p["E"][0] + W0 @ (p["C_d"] @ p["C_u"])[:, 0]
    torch.testing.assert_close(holder(x), x @ W.t() + b)
    adapter.merge()
    torch.testing.assert_close(holder(x), x @ W.t() + b, rtol=1e-5, atol=1e-6)
    adapter.merge_and_detach()
    assert type(holder[0]) is type(conv) and holder[0].weight.shape == (5, 7)
    torch.testing.assert_close(holder(x), x @ W.t() + b, rtol=1e-5, atol=1e-6)


def test_gpt2_supernet_search_merge() -> None:
    model = _gpt2()
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    import tensoradapt.torch as tt

    adapter = tt.attach(model, GLoRAConfig(rank=2, seed=1), ["c_attn", "c_proj", "c_fc"])
    assert isinstance(adapter, GLoRAAdapter) and len(adapter.target_names) == 8
    assert {adapter.views[i].kind for i in range(8)} == {"conv1d"}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)  # init is a no-op
    optimiser = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):  # supernet training: a fresh config per layer per forward
        optimiser.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimiser.step()
    model.eval()

    def evaluate() -> float:
        with torch.no_grad():
            return -float(model(ids, labels=ids).loss)

    budget = 2_000
    result = search(adapter, evaluate, budget, population=8, top_k=3, iterations=2, progress=False)
    assert result.num_params <= budget and adapter.configs == result.configs
    assert adapter.active_params() == result.num_params
    with torch.no_grad():
        unmerged = model(ids).logits
    with torch.no_grad():
        assert -float(model(ids, labels=ids).loss) == pytest.approx(result.score, rel=1e-6)
    adapter.merge()
    assert isinstance(model.transformer.h[0].attn.c_attn, GLoRALayer) and adapter.merged
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    adapter.merge_and_detach()
    assert set(model.state_dict()) == set(_gpt2().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path) -> None:
    model = _mlp()
    adapter = attach_glora(model, GLoRAConfig(rank=3, seed=5, E=("vector", "none")), ["0", "2", "4"])
    _randomise(adapter)
    configs = (LayerChoice(A="lora", rank=2), LayerChoice(C="vector", E="vector"), LayerChoice(B="scalar"))
    adapter.set_configs(configs)
    model.eval()
    x = torch.randn(4, 6)
    expected = model(x)
    path = adapter.save(tmp_path / "glora.safetensors")
    fresh = _mlp()
    loaded = GLoRAAdapter.load(fresh, path)
    assert loaded.config == adapter.config and loaded.configs == adapter.configs
    for k, v in adapter.state_tensors().items():
        assert torch.equal(loaded.state_tensors()[k], v)
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    import tensoradapt.torch as tt

    again = tt.load(_mlp(), path)
    assert isinstance(again, GLoRAAdapter) and again.configs == configs
    adapter.set_configs(None)  # a supernet without fixed configs round-trips too
    meta = adapter.metadata()
    assert meta["configs"] is None and meta["method"] == "glora"
    supernet = tt.load(_mlp(), adapter.save(tmp_path / "supernet.safetensors"))
    assert supernet.configs is None


def test_load_refuses_a_different_model(tmp_path) -> None:
    import tensoradapt.torch as tt
    from tensoradapt.torch import AdapterFileError

    model = _mlp()
    adapter = attach_glora(model, GLoRAConfig(), ["0", "2"])
    path = adapter.save(tmp_path / "g.safetensors")
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=True))
    with pytest.raises(AdapterFileError, match="has_bias"):
        tt.load(other, path)
    with pytest.raises(AdapterFileError, match="does not have"):
        tt.load(nn.Sequential(nn.Linear(6, 5)), path)
    with pytest.raises(AdapterFileError, match=r"file linear \(5, 6\) vs model linear \(5, 7\)"):
        tt.load(nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4, bias=False)), path)


# ---------------------------------------------------------------- evolutionary search
def _toy(seed: int = 0):
    """Four layers with a 12-choice space each and an additive score table: the best feasible
    individual is found by brute force over all 12^4 combinations."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    config = GLoRAConfig(rank=2, A=("lora", "vector", "none"), B=("scalar", "none"), C=("none",),
                         D=("none",), E=("vector", "none"))
    adapter = attach_glora(model, config, lambda name, m: isinstance(m, nn.Linear))
    spaces = adapter.search_spaces()
    assert all(len(s) == 12 for s in spaces)
    rng = np.random.default_rng(seed)
    value = {(li, c): float(rng.uniform(0, 1) + 0.05 * count_params(4, 4, c))
             for li, space in enumerate(spaces) for c in space}  # bigger tends to be better
    return adapter, spaces, value


def _brute_force(spaces, value, budget):
    best, best_score = None, -np.inf
    for combo in itertools.product(*spaces):
        if sum(count_params(4, 4, c) for c in combo) <= budget:
            score = sum(value[(li, c)] for li, c in enumerate(combo))
            if score > best_score:
                best, best_score = combo, score
    return best, best_score


def test_search_finds_the_best_feasible_and_never_evaluates_infeasible() -> None:
    adapter, spaces, value = _toy()
    budget = 30
    unconstrained = max(sum(max(value[(li, c)] for c in space) for li, space in enumerate(spaces)), 0)
    best, best_score = _brute_force(spaces, value, budget)
    assert best_score < unconstrained  # the budget binds
    seen = []

    def evaluate() -> float:
        configs = adapter.configs
        count = adapter.active_params()
        assert count <= budget, "an infeasible individual was evaluated"
        seen.append(configs)
        return sum(value[(li, c)] for li, c in enumerate(configs))

    result = search(adapter, evaluate, budget, seed=0, progress=False)
    assert result.configs == best
    assert result.score == pytest.approx(best_score)
    assert result.num_params == adapter.active_params() <= budget
    assert adapter.configs == best
    assert len(seen) == len(set(seen)) == result.evaluations  # cached: no individual twice
    assert len(result.history) == 21 and result.history[0].iteration == 0
    scores = [r.best_score for r in result.history]
    assert scores == sorted(scores)


def test_search_is_deterministic_for_a_seed() -> None:
    def run(seed):
        adapter, _, value = _toy()
        calls = []

        def evaluate():
            calls.append(adapter.configs)
            return sum(value[(li, c)] for li, c in enumerate(adapter.configs))

        result = search(adapter, evaluate, 25, min_params=10, population=12, top_k=4, iterations=4, seed=seed,
                        progress=False)
        return result, calls

    (r1, c1), (r2, c2), (_, c3) = run(7), run(7), run(8)
    assert r1 == r2 and c1 == c2
    assert c1 != c3
    assert all(10 <= r.best_params <= 25 for r in r1.history)


def test_search_validation(capsys) -> None:
    adapter, _, _ = _toy()
    with pytest.raises(ValueError, match=r"no configuration fits the budget \[100, 200\]"):
        search(adapter, lambda: 0.0, 200, min_params=100, progress=False)
    with pytest.raises(ValueError, match=r"min_params .* must be <= max_params"):
        search(adapter, lambda: 0.0, 5, min_params=6, progress=False)
    with pytest.raises(ValueError, match="mutation_prob must be a probability"):
        search(adapter, lambda: 0.0, 5, mutation_prob=1.5, progress=False)
    with pytest.raises(ValueError, match="population must be >= 1, got 0"):
        search(adapter, lambda: 0.0, 5, population=0, progress=False)
    for name, value in (("population", 2.5), ("max_params", "5"), ("seed", True), ("top_k", None)):
        options = {"max_params": 5, name: value}
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            search(adapter, lambda: 0.0, progress=False, **options)
    with pytest.raises(ValueError, match="max_params must be >= 0, got -1"):
        search(adapter, lambda: 0.0, -1, progress=False)
    with pytest.raises(TypeError, match="adapter must be a GLoRAAdapter"):
        search(nn.Linear(2, 2), lambda: 0.0, 5, progress=False)
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        search(adapter, 0.5, 5, progress=False)
    result = search(adapter, lambda: float("nan"), 0, population=3, iterations=1, progress=True)
    assert result.num_params == 0 and result.score == -np.inf  # NaN counts as the worst score
    assert "GLoRA search" in capsys.readouterr().err
    def failing() -> float:
        raise KeyError("validation set missing")

    adapter.set_configs(None)
    with pytest.raises(KeyError, match="validation set missing"):
        search(adapter, failing, 30, progress=False)
    assert adapter.configs is None  # restored
    adapter.set_configs(result.configs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.merge()
    with pytest.raises(RuntimeError, match="call unmerge"):
        search(adapter, lambda: 0.0, 5, progress=False)


# ---------------------------------------------------------------- from the review
def test_each_generation_evaluates_a_full_population_of_new_individuals() -> None:
    adapter, _, value = _toy()
    counts = []

    def evaluate() -> float:
        counts.append(1)
        return sum(value[(li, c)] for li, c in enumerate(adapter.configs))

    result = search(adapter, evaluate, 40, population=20, top_k=5, iterations=4, seed=1, progress=False)
    assert result.evaluations == len(counts) == 20 * 5  # 20 fresh feasible individuals per generation


def test_checkpoint_recomputation_reuses_the_sampled_configuration() -> None:
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = _gpt2()
        adapter = attach_glora(model, GLoRAConfig(rank=2, seed=3), ["c_attn", "c_fc"])
        _randomise(adapter)
        if checkpointing:
            options = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() if p.grad is not None else None for n, p in adapter.named_parameters()})
    for name, value in grads[0].items():
        if value is None:
            assert grads[1][name] is None
        else:
            torch.testing.assert_close(grads[1][name], value, rtol=1e-4, atol=1e-6)


def test_wrapper_hooks_run_and_attributes_read_through() -> None:
    model = _mlp()
    calls = []
    model[0].register_forward_hook(lambda module, args, out: calls.append(1))
    adapter = attach_glora(model, GLoRAConfig(rank=2), ["0"])
    adapter.set_configs(LayerChoice("lora", "vector", "none", "scalar", "vector"))
    model(torch.randn(2, 6))
    assert calls == []  # the base layer runs functionally (x W'ᵀ + b'), never through its forward
    assert model[0].weight is model[0].base_layer.weight and model[0].in_features == 6
    model[0].register_forward_hook(lambda module, args, out: calls.append(2))  # hooks on the wrapper run
    model(torch.randn(2, 6))
    assert calls == [2]


def test_train_mode_set_while_merged_survives_unmerge() -> None:
    model = _mlp()
    adapter = attach_glora(model, GLoRAConfig(rank=2), ["0", "4"])
    model.eval()
    with pytest.warns(UserWarning, match="largest choice"):
        adapter.merge()
    model.train()
    adapter.unmerge()
    assert model[0].training and model[4].training
