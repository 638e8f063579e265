"""Named adapters (PEFT's habits): several adapters on one model, disjoint or shared targets, the
``model.tensoradapt`` container, switching, per-adapter merge / disabled / save / load / detach."""

from __future__ import annotations

import copy
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors.torch")

from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, presets  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.q(x)) + self.v(x))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().double()


def _x() -> torch.Tensor:
    return torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _perturb(adapter: tat.BaseAdapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reference(*adapters: tat.SuperLoRAAdapter) -> Net:
    """A plain copy of the original model with every adapter's ΔW added by hand."""
    ref = _net()
    with torch.no_grad():
        for adapter in adapters:
            for name, delta in adapter.deltas().items():
                ref.get_submodule(name).weight.add_(delta)
    return ref


def _two(shared: bool, first=None, second=None) -> tuple[Net, tat.BaseAdapter, tat.BaseAdapter]:
    model = _net()
    a = tat.attach(model, first or presets.lora(2), ["q", "v"] if shared else ["q"], name="a")
    b = tat.attach(model, second or presets.lokr(2, factor=2), ["q"] if shared else ["v"], name="b")
    _perturb(a, 1)
    _perturb(b, 2)
    return model, a, b


def test_disjoint_adapters_add_their_updates() -> None:
    model, a, b = _two(shared=False)
    assert model.tensoradapt.names == ("a", "b") and model.tensoradapt.active == ("a", "b")
    assert model.tensoradapt["a"] is a and "b" in model.tensoradapt and "c" not in model.tensoradapt
    assert torch.allclose(model(_x()), _reference(a, b)(_x()), atol=1e-12)
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in (*a.trainable_parameters(), *b.trainable_parameters()))


@pytest.mark.parametrize("pair", [(presets.lora(2), presets.lokr(2, factor=2)), (presets.lokr(2, factor=2),
                                  presets.loha(2)), (presets.lora(2), presets.lora(3, alpha=2))],
                         ids=["factored+dense", "dense+dense", "factored+factored"])
def test_shared_target_one_wrapper_updates_add(pair) -> None:
    model, a, b = _two(True, *pair)
    original_q = model.q.base_layer
    assert isinstance(model.q, tat.SuperLoRALayer) and type(original_q) is nn.Linear  # the base layer once
    assert model.q in a._wrappers and model.q in b._wrappers
    assert torch.allclose(model(_x()), _reference(a, b)(_x()), atol=1e-12)
    out = model(_x())
    out.sum().backward()
    assert all(p.grad is not None for p in (*a.trainable_parameters(), *b.trainable_parameters()))
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("tensoradapt."))


def test_set_active_single_list_none() -> None:
    model, a, b = _two(shared=True)
    x = _x()
    both, only_a, only_b, plain = (_reference(a, b)(x), _reference(a)(x), _reference(b)(x), _net()(x))
    model.tensoradapt.set_active("b")
    assert model.tensoradapt.active == ("b",) and not a.active and b.active
    assert torch.allclose(model(x), only_b, atol=1e-12)
    model.tensoradapt.set_active(["a"])
    assert torch.allclose(model(x), only_a, atol=1e-12)
    model.tensoradapt.set_active(None)
    assert model.tensoradapt.active == () and torch.equal(model(x), plain)
    model.tensoradapt.set_active(["a", "b"])
    assert torch.allclose(model(x), both, atol=1e-12)
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        model.tensoradapt.set_active(["a", "c"])
    assert model.tensoradapt.active == ("a", "b")


def test_delete_leaves_the_other_working() -> None:
    model, a, b = _two(shared=True)
    x = _x()
    only_a = _reference(a)(x)
    model.tensoradapt.delete("b")
    assert model.tensoradapt.names == ("a",) and not b.attached
    assert isinstance(model.q, tat.SuperLoRALayer) and model.q._owner is a
    assert torch.allclose(model(x), only_a, atol=1e-12)
    with pytest.raises(KeyError):
        model.tensoradapt["b"]
    model.tensoradapt.delete("a")
    assert not hasattr(model, "tensoradapt") and _same(_state(model), _state(_net()))


@pytest.mark.parametrize("order", ["ab", "ba"])
@pytest.mark.parametrize("shared", [False, True])
def test_detach_order_restores_the_model_bit_for_bit(order: str, shared: bool) -> None:
    fresh = _net()
    before = _state(fresh)
    flags = {n: p.requires_grad for n, p in fresh.named_parameters()}
    model = _net()
    modules = dict(model.named_modules())
    a = tat.attach(model, presets.lora(2), ["q", "v"] if shared else ["q"], name="a")
    b = tat.attach(model, presets.lokr(2, factor=2), ["q"] if shared else ["v"], name="b",
                   modules_to_save=["head"])
    _perturb(a, 1)
    _perturb(b, 2)
    a.merge()
    b.merge()
    adapters = {"a": a, "b": b}
    adapters[order[0]].detach()
    assert model.tensoradapt.names == (order[1],)
    adapters[order[1]].detach()
    assert not hasattr(model, "tensoradapt")
    assert _same(_state(model), before)
    assert all(model.get_submodule(n) is m for n, m in modules.items() if n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_merge_unmerge_per_adapter_in_any_order() -> None:
    model, a, b = _two(shared=True)
    x = _x()
    before = _state(model)
    expected = model(x)
    a.merge()  # while b is active
    assert a.merged and not a.active and b.active
    assert torch.allclose(model(x), expected, atol=1e-12)
    assert _same(_state(model), before)  # state_dict reports the weights before any merge
    b.merge()
    assert torch.allclose(model(x), expected, atol=1e-12)
    a.unmerge()  # out of order: b stays merged, correctly
    assert b.merged and not a.merged
    assert torch.allclose(model(x), expected, atol=1e-12)
    b.unmerge()
    assert _same(_state(model), before)
    assert torch.allclose(model(x), expected, atol=1e-12)


def test_disabled_per_adapter() -> None:
    model, a, b = _two(shared=True)
    x = _x()
    with a.disabled():
        assert torch.allclose(model(x), _reference(b)(x), atol=1e-12)
        with b.disabled():
            assert torch.equal(model(x), _net()(x))
    assert torch.allclose(model(x), _reference(a, b)(x), atol=1e-12)


def test_save_and_load_named(tmp_path) -> None:
    model, a, b = _two(shared=True)
    x = _x()
    expected = model(x)
    a.save(tmp_path / "a.safetensors")
    b.save_pretrained(tmp_path / "b")
    other = _net()
    la = tat.load(other, tmp_path / "a.safetensors", name="a")
    lb = tat.load(other, tmp_path / "b", name="b")
    assert other.tensoradapt.names == ("a", "b") and other.tensoradapt["b"] is lb and la.adapter_name == "a"
    assert torch.allclose(other(x), expected, atol=1e-12)
    before = _state(other)
    with pytest.raises(RuntimeError, match="adapter named 'b'"):
        tat.load(other, tmp_path / "b", name="b")
    assert _same(_state(other), before) and other.tensoradapt.names == ("a", "b")


def test_name_collisions_and_bad_names() -> None:
    model = _net()
    tat.attach(model, presets.lora(1), ["q"], name="a")
    before = _state(model)
    with pytest.raises(RuntimeError, match="adapter named 'a'"):
        tat.attach(model, presets.lora(1), ["v"], name="a")
    for bad in ("a.b", "", "names", "set_active", "training", 3):
        with pytest.raises(ValueError, match="adapter name"):
            tat.attach(model, presets.lora(1), ["v"], name=bad)
    assert _same(_state(model), before) and model.tensoradapt.names == ("a",) and type(model.v) is nn.Linear
    with pytest.raises(ValueError, match="overlaps"):
        tat.attach(model, presets.lora(1), ["v"], name="c", modules_to_save=["q"])


def test_single_adapter_api_is_unchanged() -> None:
    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["q"])
    assert adapter.adapter_name == "default" and model.tensoradapt["default"] is adapter
    _perturb(adapter, 1)
    model.tensoradapt.merge()  # read through to the only adapter
    assert adapter.merged
    model.tensoradapt.detach()
    assert not hasattr(model, "tensoradapt")
    two, _, _ = _two(shared=False)
    with pytest.raises(AttributeError, match="several adapters"):
        two.tensoradapt.merge()


def test_mixed_superlora_and_glora() -> None:
    model = _net().eval()
    before = _state(model)
    g = tat.attach(model, GLoRAConfig(rank=2, seed=1), ["q"], name="g")
    s = tat.attach(model, presets.lora(2), ["v"], name="s")  # disjoint layers: fine
    _perturb(s, 2)
    x = _x()
    with s.disabled():
        only_g = model(x)
    with g.disabled():
        assert torch.allclose(model(x), _reference(s)(x), atol=1e-12)
    model.tensoradapt.set_active("g")
    assert torch.equal(model(x), only_g)
    model.tensoradapt.set_active(["g", "s"])
    state = _state(model)
    with pytest.raises(RuntimeError, match="cannot share a layer"):
        tat.attach(model, presets.lora(2), ["q"], name="t")  # SuperLoRA onto GLoRA's layer
    with pytest.raises(RuntimeError, match="cannot share a layer"):
        tat.attach(model, GLoRAConfig(rank=2), ["v"], name="t")  # GLoRA onto SuperLoRA's layer
    assert _same(_state(model), state) and model.tensoradapt.names == ("g", "s")
    g.detach()
    s.detach()
    assert _same(_state(model), before)


def test_state_dict_round_trip_with_two_adapters() -> None:
    model, a, b = _two(shared=True)
    x = _x()
    expected = model(x)
    state = model.state_dict()
    assert any(k.startswith("tensoradapt.a.") for k in state) and any(k.startswith("tensoradapt.b.") for k in state)
    other = _net()
    tat.attach(other, presets.lora(2), ["q", "v"], name="a")
    tat.attach(other, presets.lokr(2, factor=2), ["q"], name="b")
    other.load_state_dict(state)
    assert torch.allclose(other(x), expected, atol=1e-12)
    a.merge()  # a merged state dict does not count ΔW twice
    third = copy.deepcopy(other)
    third.load_state_dict(model.state_dict())
    assert torch.allclose(third(x), expected, atol=1e-12)
    clone = copy.deepcopy(model)
    assert torch.allclose(clone(x), expected, atol=1e-12) and clone.tensoradapt["b"] is not b


def test_threads_on_a_shared_target_match_serial_and_mutate_nothing() -> None:
    model, _, _ = _two(shared=True)
    xs = [torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    before = _state(model)
    with torch.no_grad():
        serial = [model(x) for x in xs]
    results: dict[int, torch.Tensor] = {}

    def work(k: int) -> None:
        with torch.no_grad():
            for i in range(k, len(xs), 4):
                results[i] = model(xs[i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[i], serial[i]) for i in range(len(xs)))
    assert _same(_state(model), before)


def test_merge_and_detach_one_of_two_keeps_the_other_correct() -> None:
    model, a, b = _two(shared=True)
    x = _x()
    expected = model(x)
    a.merge_and_detach()
    assert model.tensoradapt.names == ("b",) and model.q._owner is b
    assert torch.allclose(model(x), expected, atol=1e-12)
    b.detach()
    assert torch.allclose(model(x), _reference(a)(x), atol=1e-12) and type(model.q) is nn.Linear


@pytest.mark.filterwarnings("ignore:merging without fixed configs")
def test_glora_merge_while_superlora_active() -> None:
    model = _net().eval()
    g = tat.attach(model, GLoRAConfig(rank=2, seed=1), ["q"], name="g")
    s = tat.attach(model, presets.lokr(2, factor=2), ["v"], name="s")
    _perturb(g, 3)
    _perturb(s, 4)
    x = _x()
    expected = model(x)
    g.merge()
    assert torch.allclose(model(x), expected, atol=1e-12)
    s.merge()
    g.unmerge()
    assert torch.allclose(model(x), expected, atol=1e-12)
    s.unmerge()
    assert torch.allclose(model(x), expected, atol=1e-12)
