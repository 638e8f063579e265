"""Quantised base layers (QLoRA-style): bitsandbytes Linear4bit / Linear8bitLt on CPU and torchao
int8 weight-only Linear.  The adapter trains through ``base(x) + x ΔWᵀ`` without touching the
quantised weight; merge refuses clearly; GLoRA (which needs the dense W0) is refused at attach.
Each test skips cleanly where its package does not import."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, presets  # noqa: E402


def _dense() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def _bnb_model(kind: str) -> nn.Sequential:
    bnb = pytest.importorskip("bitsandbytes")
    model = _dense()
    for i in (0, 2):
        dense = model[i]
        if kind == "4bit":
            q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=True, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=True, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        model[i] = q.to("cpu")
    return model


def _torchao_model() -> nn.Sequential:
    quantization = pytest.importorskip("torchao.quantization")
    model = _dense()
    try:
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    except Exception as error:  # pragma: no cover - an incompatible torchao build
        pytest.skip(f"torchao cannot quantise here: {error}")
    return model


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A comparable tensor: a quantised tensor subclass (torchao) dequantised."""
    return t.dequantize() if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "dequantize") else t


def _check(model: nn.Module, config) -> None:
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    state = {k: _plain(v).clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    adapter = tat.attach(model, config, ["0", "2"])
    assert adapter.target_names == ("0", "2")
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # ΔW = 0 at init
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        trained = model(x)
    assert not torch.equal(trained, reference)
    with pytest.raises(RuntimeError, match=r"cannot merge into quantised target '0'.*not changed"):
        adapter.merge()
    adapter.detach()
    after = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(_plain(after[k]), v) for k, v in state.items())  # the quantised weights never changed


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("config", [presets.lora(4), presets.lorta(3, 4)], ids=["lora", "lorta"])
def test_bitsandbytes_base(kind, config) -> None:
    _check(_bnb_model(kind), config)


def test_bitsandbytes_glora_is_refused() -> None:
    model = _bnb_model("4bit")
    with pytest.raises(TypeError, match=r"GLoRA needs the dense base weight W0.*quantised Linear4bit"):
        tat.attach(model, GLoRAConfig(rank=2), ["0"])
    assert not hasattr(model, "tensoradapt")


@pytest.mark.parametrize("config", [presets.lora(4), presets.lorta(3, 4)], ids=["lora", "lorta"])
def test_torchao_int8_weight_only_base(config) -> None:
    _check(_torchao_model(), config)
