"""tensoradapt.torch.attach on small models: PEFT's good tests, on several presets."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import SuperLoRA, SuperLoRAConfig, buffers, count_params, presets  # noqa: E402
from tensoradapt.torch import functional as taf  # noqa: E402

PRESETS = {
    "lora": presets.lora(2, alpha=4),
    "lokr": presets.lokr(2, factor=4),
    "lotr": presets.lotr(2, num_weights=4),
    "lorta": presets.lorta(3, 2),
    "lonkr": presets.lonkr(2, 2),
    "fastfood": presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5),
    "grouped-G3": SuperLoRAConfig(rank=2, order=2, grouping=3),
}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.query(x)) * self.value(x))


class Net(nn.Module):
    """Two blocks with equal-shape query/value weights (LoTR needs equal shapes) and a head."""

    def __init__(self, width: int = 12, checkpointing: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, 3)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            if self.checkpointing is None:
                h = block(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
        return self.head(h)


def _model(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(7, 5, generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, adapter, steps: int = 3, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=lr)
    x = _x()
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _targets(name: str) -> list[str]:
    return ["query", "value"]


@pytest.mark.parametrize("name", PRESETS)
def test_init_is_a_no_op_then_training_changes_only_the_adapter(name) -> None:
    model = _model()
    reference = copy.deepcopy(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x()
    expected = model(x)
    adapter = tat.attach(model, PRESETS[name], _targets(name))
    assert torch.equal(model(x), expected)
    before = {n: p.detach().clone() for n, p in adapter.named_trainable_parameters()}
    _train(model, adapter)
    for n, p in adapter.named_trainable_parameters():
        assert not torch.equal(p, before[n]), f"{name}: {n} did not change"
    base_now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "tensoradapt." not in k}
    assert base_now.keys() == base_state.keys()
    for k, v in base_state.items():
        assert torch.equal(base_now[k], v), k
    assert not torch.allclose(model(x), expected)
    # merge: outputs equal the unmerged ones; merging twice is refused; unmerge / detach restore bit for bit
    unmerged = model(x).detach()
    adapter.merge()
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"already merged"):
        adapter.merge()
    adapter.unmerge()
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)
    adapter.merge()
    restored = adapter.detach()
    assert restored is model
    assert not hasattr(model, "tensoradapt")
    assert type(model.blocks[0].query) is nn.Linear
    for (k, v), (k2, v2) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("name", ["lora", "lorta", "fastfood"])
def test_save_then_load_into_a_fresh_copy_gives_identical_outputs(name, tmp_path) -> None:
    model = _model()
    fresh = copy.deepcopy(model)
    adapter = tat.attach(model, PRESETS[name], _targets(name))
    _train(model, adapter)
    path = adapter.save(tmp_path / "adapter.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left
    loaded = tat.load(fresh, path)
    x = _x(3)
    assert torch.equal(fresh(x), model(x))
    assert loaded.config == adapter.config and loaded.target_names == adapter.target_names
    meta = tat.read_metadata(path)
    assert meta["format_version"] == tat.FORMAT_VERSION and meta["method"] == "superlora"
    assert meta["targets"][0] == {"name": "blocks.0.query", "kind": "linear", "shape": [12, 12],
                                  "weight_shape": [12, 12]}
    assert meta["seed"] == adapter.seed and meta["generator_id"] == adapter.generator_id == buffers.GENERATOR_ID


def _record(monkeypatch, plan, method: str) -> list:
    calls: list = []
    original = getattr(plan, method)
    monkeypatch.setattr(plan, method, lambda *args: calls.append(args[1]) or original(*args))
    return calls


def test_a_projected_component_is_generated_once_per_forward_and_once_per_backward(monkeypatch) -> None:
    model = _model()
    config = presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5)  # one group, 6 targets
    adapter = tat.attach(model, config, ["query", "value", "out"])
    calls = _record(monkeypatch, adapter.plan, "delta_for")
    vjps = _record(monkeypatch, adapter.plan, "vjp_group")
    loss = model(_x()).sum()
    assert len(calls) == 1  # the forward: once for the component, shared by its six targets
    loss.backward()
    assert len(calls) == 2 and vjps == [0]  # the backward: recomputed once, one VJP of the group
    model(_x())
    assert len(calls) == 3
    with torch.no_grad():
        model.eval()
        model(_x())
    assert len(calls) == 4


def test_sliced_targets_never_generate_their_whole_group(monkeypatch) -> None:
    """No model-wide ΔW: a target of a one-group LoRTA generates its own slice in its forward and
    again in its backward; the group as a whole is never generated."""
    model = _model()
    adapter = tat.attach(model, presets.lorta(3, 2), ["query", "value", "out"])  # one group, 6 targets
    whole = _record(monkeypatch, adapter.plan, "delta_for")
    sliced = _record(monkeypatch, adapter.plan, "delta_target")
    loss = model(_x()).sum()
    assert sliced == list(range(6)) and whole == []
    loss.backward()
    assert sorted(sliced[6:]) == list(range(6)) and whole == []

    per_weight = _model()
    adapter = tat.attach(per_weight, presets.lorta(3, 2, groups="weight"), ["query", "value"])
    sliced = _record(monkeypatch, adapter.plan, "delta_target")
    per_weight.blocks[1](torch.randn(2, 12))  # a block on its own: only its own two targets
    assert sliced == [2, 3]


@pytest.mark.parametrize("config", [presets.lorta(3, 2, groups=1),
                                    presets.with_projection(presets.lorta(3, 2, groups=1), "fastfood", 0.5),
                                    presets.lokr(2, factor=4)], ids=["sliced", "projected", "kronecker"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(mode, config) -> None:
    grads = {}
    for checkpointing in (None, mode):
        model = _model(checkpointing=checkpointing)
        adapter = tat.attach(model, config, ["query", "value", "embed"], seed=3)
        with torch.no_grad():  # a non-trivial point
            for p in adapter.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        x = _x().requires_grad_(checkpointing == "reentrant")
        model(x).square().sum().backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in adapter.named_trainable_parameters()}
    for name, value in grads[None].items():
        torch.testing.assert_close(grads[mode][name], value, rtol=1e-5, atol=1e-6)


def test_disabled_runs_the_base_model() -> None:
    model = _model()
    x = _x()
    expected = model(x)
    adapter = tat.attach(model, presets.lora(2), ["query", "value"])
    _train(model, adapter)
    adapted = model(x)
    with adapter.disabled():
        assert torch.equal(model(x), expected)
        with adapter.disabled():
            assert torch.equal(model(x), expected)
        assert torch.equal(model(x), expected)
    assert torch.equal(model(x), adapted)


def test_merge_refuses_non_finite_delta_and_leaves_the_model_unchanged() -> None:
    model = _model()
    adapter = tat.attach(model, presets.lora(2), ["query", "value"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(iter(adapter.trainable_parameters())).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"non-finite.*not changed"):
        adapter.merge()
    assert not adapter.merged
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) or k.startswith("tensoradapt."), k


def test_unmerge_and_detach_errors() -> None:
    model = _model()
    adapter = tat.attach(model, presets.lora(2), ["query"])
    with pytest.raises(RuntimeError, match=r"not merged"):
        adapter.unmerge()
    with pytest.raises(RuntimeError, match=r"already has an attribute 'tensoradapt'"):
        tat.attach(model, presets.lora(2), ["value"])
    adapter.detach()
    with pytest.raises(RuntimeError, match=r"detached"):
        adapter.merge()


def test_merge_and_detach_gives_a_plain_model_with_merged_weights() -> None:
    model = _model()
    adapter = tat.attach(model, presets.lotr(2, num_weights=4), ["query", "value"])
    _train(model, adapter)
    x = _x()
    expected = model(x).detach()
    plain = adapter.merge_and_detach()
    assert type(plain.blocks[0].query) is nn.Linear and not hasattr(plain, "tensoradapt")
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-6)


def test_target_selection() -> None:
    model = _model()
    by_suffix = [n for n, _ in tat.match_targets(model, ["query", "value"])]
    assert by_suffix == ["blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value"]
    assert [n for n, _ in tat.match_targets(model, r"blocks\.\d+\.(query|value)")] == by_suffix
    assert [n for n, _ in tat.match_targets(model, lambda n, m: n.endswith("value"))] == by_suffix[1::2]
    with pytest.raises(ValueError, match=r"matched no module"):  # suffixes match whole name components
        tat.match_targets(model, ["ue"])
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        tat.match_targets(model, "(")
    with pytest.raises(TypeError, match=r"targets must be a non-empty list"):
        tat.match_targets(model, [])
    with pytest.raises(TypeError, match=r"adapters support nn.Linear"):
        tat.attach(model, presets.lora(2), ["blocks.0"])
    with pytest.raises(TypeError, match=r"config must be a tensoradapt.SuperLoRAConfig"):
        tat.attach(model, {"rank": 2}, ["query"])


def test_conv_and_1d_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 2, 6, 6)
    expected = model(x)
    adapter = tat.attach(model, presets.lorta(3, 2), ["0", "2"])
    assert adapter.plan.shapes == ((4, 18), (3, 4))
    assert torch.equal(model(x), expected)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    adapted = model(x).detach()
    adapter.merge()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"is a LayerNorm; adapters support"):
        tat.attach(nn.Sequential(nn.LayerNorm(4)), presets.lora(1), ["0"])


def test_summary_and_counts() -> None:
    model = _model()
    adapter = tat.attach(model, presets.lorta(3, 2), ["query", "value"])
    assert adapter.num_params == count_params(presets.lorta(3, 2), [(12, 12)] * 4)
    assert sum(p.numel() for p in adapter.trainable_parameters()) == adapter.num_params
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter.num_params
    text = adapter.summary()
    assert text.splitlines()[0].startswith(f"trainable params: {adapter.num_params:,} || all params: ")
    assert "blocks.1.value" in text and "tucker" in text


def test_freeze_base_false_keeps_flags() -> None:
    model = _model()
    adapter = tat.attach(model, presets.lora(2), ["query"], freeze_base=False)
    assert model.head.weight.requires_grad
    adapter.detach()
    assert model.head.weight.requires_grad


def test_component_function_gradcheck() -> None:
    plan = SuperLoRA(SuperLoRAConfig(rank=2, order=3, grouping=((0, 2), (1,))), [(3, 4), (2, 5), (4, 2)])
    params = plan.init(0, xp=torch, dtype=torch.float64, zero=False)
    for targets, groups in plan.components():
        names = sorted(plan.parameter_shapes(groups))
        values = [params[n].clone().requires_grad_(True) for n in names]

        def fn(*vals, targets=targets, names=names):
            return tuple(taf.superlora_component_delta(plan, targets, dict(zip(names, vals, strict=True))))

        assert torch.autograd.gradcheck(fn, values)


def test_float64_model_gets_float64_parameters_and_bf16_autocast_keeps_fp32_reconstruction() -> None:
    model = _model().double()
    adapter = tat.attach(model, presets.lora(2), ["query"])
    assert all(p.dtype == torch.float64 for p in adapter.trainable_parameters())
    model = _model()
    adapter = tat.attach(model, presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5), ["query", "value"])
    seen = []
    original = adapter.plan.delta_for
    adapter.plan.delta_for = lambda p, t: seen.append(original(p, t)) or seen[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_x())
    assert out.dtype == torch.bfloat16
    assert seen and all(d.dtype == torch.float32 for deltas in seen for d in deltas)


def test_bf16_model_trains() -> None:
    model = _model().to(torch.bfloat16)
    adapter = tat.attach(model, presets.lora(2), ["query", "value"])
    assert all(p.dtype == torch.float32 for p in adapter.trainable_parameters())
    x = _x().to(torch.bfloat16)
    expected = model(x)
    with adapter.disabled():
        assert torch.equal(model(x), expected)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.trainable_parameters())


@pytest.mark.gpu
def test_cuda_bf16_training_and_merge() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = _model().cuda().to(torch.bfloat16)
    adapter = tat.attach(model, presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5), ["query", "value"])
    x = _x().cuda().to(torch.bfloat16)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    out = model(x).float()
    adapter.merge()
    torch.testing.assert_close(model(x).float(), out, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- from the review: edge cases
def test_interrupted_forward_does_not_leave_a_stale_delta() -> None:
    model = _model()
    adapter = tat.attach(model, presets.lora(2), ["query", "value"])

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model.head.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        model(_x())
    handle.remove()
    outputs = []
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for _ in range(3):
        out = model(_x())
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
        outputs.append(out.detach())
    assert not torch.equal(outputs[1], outputs[2])  # ΔW follows the parameters
    with torch.no_grad():
        expected = model(_x())
        adapter.reset_cache()
        assert torch.equal(model(_x()), expected)


def test_deepcopy_and_pickle_of_an_attached_model() -> None:
    import pickle

    model = _model()
    adapter = tat.attach(model, presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5), ["query", "value"])
    _train(model, adapter)
    x = _x()
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), expected)
        own = clone.tensoradapt["default"]
        assert own is not adapter and clone.blocks[0].query._owner is own
        clone.tensoradapt.detach()
        assert type(clone.blocks[0].query) is nn.Linear
    assert torch.equal(model(x), expected)  # the original is untouched


def test_tied_aliased_and_multihead_targets_are_refused() -> None:
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"target '0' shares its weight with module '1' \(tied"):
        tat.attach(tied, presets.lora(1), ["0", "1"])
    shared = nn.Linear(4, 4)
    aliased = nn.Module()
    aliased.p, aliased.q = shared, shared
    with pytest.raises(ValueError, match="reachable under several names"):
        tat.attach(aliased, presets.lora(1), ["p"])
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        tat.attach(mha, presets.lora(1), ["out_proj"])


def test_wrapped_layer_reads_through_to_the_base_layer() -> None:
    model = _model()
    tat.attach(model, presets.lora(2), ["query"])
    layer = model.blocks[0].query
    assert layer.weight is layer.base_layer.weight and layer.in_features == 12
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("config", [presets.lora(2), presets.lorta(3, 2)], ids=["factored", "generated"])
def test_in_place_change_between_forward_and_backward_and_double_backward_are_refused(config) -> None:
    model = _model()
    adapter = tat.attach(model, config, ["query"])
    loss = model(_x()).square().sum()
    with torch.no_grad():
        adapter.trainable_parameters()[0].add_(1.0)
    with pytest.raises(RuntimeError, match=r"modified in place|modified by an inplace operation"):
        loss.backward()
    if adapter.factored_targets:  # plain autograd: double backward is fine there
        return
    out = model(_x()).square().sum()
    grads = torch.autograd.grad(out, adapter.trainable_parameters(), create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad|double backward"):
        sum(g.square().sum() for g in grads).backward()


def test_merge_refuses_an_overflowing_half_precision_weight() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).half()
    with torch.no_grad():
        model[0].weight.fill_(60000.0)
    adapter = tat.attach(model, presets.lora(1), ["0"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.fill_(100.0)
    before = model[0].base_layer.weight.clone()
    with pytest.raises(FloatingPointError, match="overflows"):
        adapter.merge()
    assert torch.equal(model[0].base_layer.weight, before)


@pytest.mark.parametrize("target", ["query", "c_attn"])
def test_lora_factored_path_equals_the_generated_delta_path(target) -> None:
    """The LoRA preset runs ``base(x) + s (x V) Uᵀ`` (never forming ΔW); it must agree with
    ``x (W + ΔW)ᵀ`` in outputs and gradients."""
    if target == "c_attn":
        transformers = pytest.importorskip("transformers")
        make = lambda: transformers.GPT2Model(transformers.GPT2Config(  # noqa: E731
            n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
        run = lambda m: m(input_ids=torch.arange(8).reshape(1, 8) % 20).last_hidden_state  # noqa: E731
    else:
        make, run = _model, lambda m: m(_x())
    results = []
    for factored in (True, False):
        torch.manual_seed(0)
        model = make()
        adapter = tat.attach(model, presets.lora(3, alpha=6), [target], seed=4)
        assert bool(adapter.factored_targets) is True
        if not factored:
            adapter.factored_targets = {}
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        out = run(model)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in adapter.named_trainable_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-5)
    assert not tat.attach(_model(), presets.lokr(2, factor=4), ["query"]).factored_targets
