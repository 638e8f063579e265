"""The train-step paths of docs/math.md §6: a target's ΔW regenerated in its backward (sliced or
through its projected component) and Kronecker/Hadamard products applied to activations, against
the path that materialises ΔW (the one torch.compile runs), on every module kind."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import presets  # noqa: E402
from tensoradapt.torch.memory import lora_step_memory  # noqa: E402
from tensoradapt.torch.superlora import adapter as adapter_module  # noqa: E402

CONFIGS = {
    "lorta-G1": presets.lorta(3, 2, groups=1),
    "lorta-G2-cp": presets.lorta(3, 2, groups=2, core="cp"),
    "lonkr": presets.lonkr(2, 2),
    "dense-G1": presets.dense(1),
    "lokr": presets.lokr(2, factor=2),
    "krona": presets.krona(factor=2),
    "loha": presets.loha(1),
    "fastfood": presets.with_projection(presets.lorta(3, 2, groups=1), "fastfood", 0.5),
    "shuffle-global": presets.with_projection(presets.lorta(2, 2, groups=2), "shuffle", scope="global"),
}


class _Net(nn.Module):
    """Every module kind an adapter takes: Embedding (with a padding row), Linear, Conv1d with a
    reflecting pad, Conv2d, transformers' Conv1D."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8, padding_idx=0)
        self.linear = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.gpt = transformers.pytorch_utils.Conv1D(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.linear(self.embed(ids)))  # (B, T, 8)
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        img = self.conv2(h.reshape(h.shape[0], 2, h.shape[1], 4))
        return self.gpt(torch.tanh(img.reshape(h.shape[0], h.shape[1], -1)[..., :8]))


TARGETS = ["embed", "linear", "conv", "conv2", "gpt"]
#: ``keep_delta_bytes`` that makes an adapter form ΔW (the reference path; patching
#: ``torch.compiler.is_compiling`` instead would leave Dynamo's trace rules broken for later tests)
_ALWAYS = 1 << 62


def _run(config, materialise: bool, dtype=torch.float64):
    torch.manual_seed(0)
    model = _Net().to(dtype)
    adapter = tat.attach(model, config, TARGETS, seed=1, dtype=dtype)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, dtype=dtype, generator=torch.Generator().manual_seed(p.numel())))
    if materialise:  # the path that forms ΔW: a tensor added to W (what torch.compile runs too)
        adapter.bypass_targets = {}
        adapter.factored_targets = {}
        adapter.keep_delta_bytes = _ALWAYS
    ids = torch.tensor([[0, 3, 5, 7], [1, 0, 9, 2]])
    out = model(ids)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in adapter.named_trainable_parameters()}, adapter


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_path_equals_the_materialised_delta(name) -> None:
    out, grads, adapter = _run(CONFIGS[name], False)
    ref_out, ref_grads, _ = _run(CONFIGS[name], True)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for key, value in ref_grads.items():
        torch.testing.assert_close(grads[key], value, rtol=1e-9, atol=1e-11)
    paths = {adapter.target_path(i) for i in range(len(TARGETS))}
    expected = {"fastfood": {"projected"}, "shuffle-global": {"projected"}}.get(name)
    if expected is not None:
        assert paths == expected
    elif name in ("lokr", "krona", "loha"):
        assert "bypass" in paths  # Linear and Conv1D apply the product to activations
    else:
        assert paths == {"sliced"}


@pytest.mark.parametrize("name", ["lorta-G1", "fastfood", "lokr", "loha"])
def test_gradcheck_in_float64(name) -> None:
    torch.manual_seed(0)
    model = _Net().double()
    adapter = tat.attach(model, CONFIGS[name], TARGETS, seed=1, dtype=torch.float64)
    names = [n for n, _ in adapter.named_trainable_parameters()]
    params = [p for _, p in adapter.named_trainable_parameters()]
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(p.numel())))
    ids = torch.tensor([[0, 3, 5, 7]])

    def through_params(*values: torch.Tensor) -> torch.Tensor:
        """The model's output as a function of its adapter parameters (gradcheck perturbs them in place)."""
        del values
        return model(ids).sum()

    assert names
    assert torch.autograd.gradcheck(through_params, tuple(params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_no_delta_sized_tensor_is_saved_for_the_backward() -> None:
    """A one-group LoRTA on every linear projection of a small Llama saves nothing ΔW-sized for its
    backward: what autograd keeps is the base model's own activations plus the factors."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=50)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(0))
    saved_sizes = {}
    for adapted in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        if adapted:
            adapter = tat.attach(model, presets.lorta(3, 4, groups=1), targets)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            model.model.embed_tokens.weight.requires_grad_(True)  # so that a graph exists
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids).logits.sum()
        saved_sizes[adapted] = sizes
    weights = min(m.weight.numel() for n, m in model.named_modules() if n.endswith(tuple(targets)))
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen  # the frozen weights are saved by reference, as the base model saves them too
    big_new = [s for s in saved_sizes[True] if s >= weights and s not in saved_sizes[False]]
    assert big_new == [], big_new
    assert len(adapter.plan.groups) == 1 and all(adapter.target_path(i) == "sliced" for i in range(14))


def test_the_seven_b_plan_is_within_peft_lora_memory_plus_two_gib() -> None:
    """Issue 19's target on shapes only (meta device): an all-linear one-group LoRTA on a 7B Llama
    in bf16 is predicted to need at most PEFT LoRA r=8's extra step memory + 2 GiB."""
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = tat.attach(model, presets.lorta(3, 32, groups=1), targets)
    ours = adapter.step_memory(tokens=4096)
    peft = lora_step_memory(adapter.plan.shapes, 8, tokens=4096, activation_bytes=2)
    assert ours.total <= peft.total + 2 * 2**30, (str(ours), str(peft))
    assert ours.working >= 4096 * 11008 * 4  # at least one target's ΔW in fp32
    assert "predicted extra memory of an AdamW step" in adapter.summary()


# ---------------------------------------------------------------------------------- review regressions
def _linears(config, seed: int = 0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).to(dtype)
    adapter = tat.attach(model, config, ["0", "2", "4"], seed=1, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    return model, adapter


FASTFOOD = presets.with_projection(presets.lorta(3, 2, groups=1), "fastfood", 0.5)


@pytest.mark.parametrize("config", [presets.lokr(2, factor=4), presets.loha(1)], ids=["lokr", "loha"])
def test_bypass_runs_under_cpu_autocast(config) -> None:
    model, adapter = _linears(config, dtype=torch.float32)
    assert adapter.target_path(0) == "bypass"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())


@pytest.mark.parametrize("config", [FASTFOOD, presets.lorta(3, 2, groups=1)], ids=["projected", "sliced"])
def test_a_backward_that_stops_at_the_input_leaves_nothing_for_the_next(config) -> None:
    grads = []
    for partial in (False, True):
        model, adapter = _linears(config)
        x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
        loss = model(x).square().sum()
        if partial:
            torch.autograd.grad(loss, x, retain_graph=True)
            loss.backward(inputs=[x], retain_graph=True)
        loss.backward()
        grads.append([p.grad.clone() for p in adapter.trainable_parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("config", [FASTFOOD, presets.lorta(3, 2, groups=1)], ids=["projected", "sliced"])
def test_an_input_gradient_penalty_equals_the_materialised_path(config) -> None:
    results = []
    for materialise in (False, True):
        model, adapter = _linears(config)
        if materialise:
            adapter.keep_delta_bytes = _ALWAYS
        x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
        out = model(x).square().sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (out + gx.square().sum()).backward()
        results.append([p.grad.clone() for p in adapter.trainable_parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class _Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(torch.cat([h, h], -1))


@pytest.mark.parametrize("projection", ["fastfood", "shuffle"])
def test_a_projected_component_of_some_groups_of_the_plan(projection) -> None:
    """``grouping=4`` over weights of 256, 256 and 512 entries: the last component holds groups 2
    and 3 of the plan's four."""
    config = presets.with_projection(presets.lorta(2, 2, groups=4), projection)
    results = []
    for materialise in (False, True):
        torch.manual_seed(0)
        model = _Three().double()
        adapter = tat.attach(model, config, ["a", "b", "c"], seed=1, dtype=torch.float64)
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
        assert ((2,), (2, 3)) in adapter.plan.components()
        if materialise:
            adapter.keep_delta_bytes = _ALWAYS
        model(torch.ones(2, 16, dtype=torch.float64)).square().sum().backward()
        results.append([p.grad.clone() for p in adapter.trainable_parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_layer_called_outside_a_model_forward_releases_its_component(monkeypatch) -> None:
    from tensoradapt.torch.target_forward import ComponentPass

    model, adapter = _linears(FASTFOOD)
    made: list[ComponentPass] = []
    original = ComponentPass.__init__
    monkeypatch.setattr(ComponentPass, "__init__", lambda self, *a, **k: made.append(self) or original(self, *a, **k))
    x = torch.randn(2, 16, dtype=torch.float64)
    out = model[4](torch.tanh(model[2](torch.tanh(model[0](x)))))  # the layers on their own, no model forward
    assert len(made) == 3 and all(p.outputs is None for p in made)  # nothing held until the backward
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())


def test_an_in_place_change_before_an_input_gradient_raises_on_projected_targets() -> None:
    model, adapter = _linears(FASTFOOD)
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    loss = model(x).sum()
    with torch.no_grad():
        adapter.trainable_parameters()[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, x)


def test_a_bf16_adapter_never_rounds_an_fp32_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(3, 16)
    before = model(x)
    tat.attach(model, presets.lorta(3, 2, groups=1), ["0"], dtype=torch.bfloat16)  # ΔW = 0 at init
    assert torch.equal(model(x), before)


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, torch.tanh(x), use_reentrant=False)
        return x


def test_checkpointing_shares_the_recomputed_component_outputs() -> None:
    """Non-reentrant checkpointing recomputes a block in the backward, which builds a second pass of
    the component; the forward's pass then takes its outputs instead of computing its own."""
    from tensoradapt.torch.target_forward import ComponentPass

    torch.manual_seed(0)
    model = _Checkpointed().double()
    tat.attach(model, FASTFOOD, ["blocks.0", "blocks.1", "blocks.2"], dtype=torch.float64)
    computed: list[int] = []
    original = ComponentPass.output

    def output(self, position):
        if self.outputs is None and (self.find_outputs is None or self.find_outputs(self) is None):
            computed.append(position)
        return original(self, position)

    ComponentPass.output = output
    try:
        model(torch.randn(2, 16, dtype=torch.float64)).sum().backward()
    finally:
        ComponentPass.output = original
    assert len(computed) == 2  # the forward's pass, and the recompute's (shared by the backward)


def test_a_small_model_wide_delta_is_kept_and_gives_the_same_step(monkeypatch) -> None:
    """Below ``keep_delta_bytes`` (64 MiB by default) ΔW is generated once per forward and kept for the
    backward (the fastest path); above it never.  Both give the same outputs and gradients."""
    results = []
    for keep in (adapter_module.KEEP_DELTA_BYTES, 64 << 20):
        monkeypatch.setattr(adapter_module, "KEEP_DELTA_BYTES", keep)
        model, adapter = _linears(FASTFOOD)
        assert adapter.keeps_delta == (keep > 0)
        assert {adapter.target_path(i) for i in range(3)} == ({"materialised"} if keep else {"projected"})
        x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in adapter.trainable_parameters()]))
        adapter.keep_delta_bytes = 0  # the attribute decides, per adapter
        assert not adapter.keeps_delta
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for got, want in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
