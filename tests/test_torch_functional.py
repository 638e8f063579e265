"""torch autograd Functions over the core VJPs: gradcheck in float64 and agreement with autograd."""

from __future__ import annotations

import pytest
import torch

from tensoradapt import SuperLoRA, ops, presets
from tensoradapt.torch import functional as F

torch.manual_seed(0)


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_tucker_gradcheck_and_autograd_reference() -> None:
    core, a, b, c = _leaf(2, 3, 2), _leaf(4, 2), _leaf(3, 3), _leaf(5, 2)
    assert torch.autograd.gradcheck(lambda *t: F.tucker_to_tensor(t[0], t[1:]), (core, a, b, c))
    reference = torch.einsum("abc,Aa,Bb,Cc->ABC", core, a, b, c)
    torch.testing.assert_close(F.tucker_to_tensor(core, [a, b, c]), reference)


@pytest.mark.parametrize("weighted", [True, False])
def test_cp_gradcheck(weighted: bool) -> None:
    weights = _leaf(3) if weighted else None
    factors = (_leaf(4, 3), _leaf(2, 3), _leaf(3, 3))
    assert torch.autograd.gradcheck(lambda *f: F.cp_to_tensor(weights, f), factors)
    if weighted:
        assert torch.autograd.gradcheck(lambda w: F.cp_to_tensor(w, factors), (weights,))


def test_kron_gradcheck_and_torch_kron() -> None:
    tensors = (_leaf(2, 3), _leaf(3, 2), _leaf(2, 2))
    assert torch.autograd.gradcheck(lambda *t: F.kron(t), tensors)
    torch.testing.assert_close(F.kron(tensors), torch.kron(torch.kron(tensors[0], tensors[1]), tensors[2]))


def test_cut_pad_shuffle_fastfood_fwht_gradcheck() -> None:
    x = _leaf(3, 4)
    assert torch.autograd.gradcheck(lambda t: F.cut(t, 7), (x,))
    assert torch.autograd.gradcheck(lambda t: F.pad(t, (3, 3)), (_leaf(7),))
    assert torch.autograd.gradcheck(lambda t: F.shuffle(t, ops.Shuffle(4, seed=1)), (x,))
    assert torch.autograd.gradcheck(lambda t: F.fastfood(t, ops.Fastfood(4, 11, seed=2)), (x,))
    assert torch.autograd.gradcheck(lambda t: F.fastfood(t, ops.Fastfood(4, 11, seed=2, order="paper")), (x,))
    assert torch.autograd.gradcheck(lambda t: F.fwht(t, 0), (_leaf(8, 3),))


def test_cut_output_does_not_alias_its_input() -> None:
    x = _leaf(2, 3)
    y = F.cut(x, 6)
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "config",
    [presets.lora(2), presets.lokr(2), presets.loha(2), presets.lotr(2, 2), presets.lonkr(3, 2, 2),
     presets.lorta(3, 2, 2), presets.with_projection(presets.lorta(3, 2), "fastfood", 0.4),
     presets.with_projection(presets.lorta(2, 2, 1, "identity"), "shuffle", scope="global")],
    ids=["lora", "lokr", "loha", "lotr", "lonkr", "lorta", "fastfood", "shuffle-global"],
)
def test_superlora_delta_gradcheck(config) -> None:
    plan = SuperLoRA(config, [(4, 3), (4, 3)])
    params = {k: v.requires_grad_() for k, v in plan.init(0, xp=torch, dtype=torch.float64, zero=False).items()}
    names = sorted(params)

    def run(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(F.superlora_delta(plan, dict(zip(names, values, strict=True))))

    assert torch.autograd.gradcheck(run, tuple(params[n] for n in names))


def test_superlora_delta_unused_outputs_and_errors() -> None:
    plan = SuperLoRA(presets.lora(2), [(4, 3), (2, 2)])
    params = {k: v.requires_grad_() for k, v in plan.init(0, xp=torch, dtype=torch.float64, zero=False).items()}
    first, _ = F.superlora_delta(plan, params)
    first.sum().backward()  # the second output gets no gradient: treated as zero
    assert params["g1.split1.factor0"].grad is None or not params["g1.split1.factor0"].grad.any()
    assert params["g0.split1.factor0"].grad.abs().sum() > 0
    with pytest.raises(TypeError, match=r"plan must be a tensoradapt\.SuperLoRA"):
        F.superlora_delta(object(), params)
    with pytest.raises(TypeError, match=r"op must be a tensoradapt\.ops\.Shuffle"):
        F.shuffle(torch.ones(4), ops.Fastfood(4, 4, 0))


def test_functions_compute_in_their_inputs_dtype_under_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    core = torch.randn(2, 2, 2, generator=gen, requires_grad=True)
    factors = [torch.randn(5, 2, generator=gen, requires_grad=True) for _ in range(3)]
    z = torch.randn(10, generator=gen, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = F.tucker_to_tensor(core, factors)
        y = F.fastfood(z, ops.Fastfood(10, 40, seed=0))
        k = F.kron([factors[0], factors[1]])
    assert x.dtype == y.dtype == k.dtype == torch.float32
    (x.sum() + y.sum() + k.sum()).backward()
    assert core.grad.dtype == z.grad.dtype == torch.float32
    reference = ops.tucker_to_tensor(core.detach().double(), [f.detach().double() for f in factors])
    torch.testing.assert_close(x.double(), reference, rtol=1e-6, atol=1e-6)
