"""A real client: transformers GPT-2 (Conv1D targets) and ViT (Linear targets) built from small
configs (nothing is downloaded): attach, train a few steps, merge, compare, save and load."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import presets  # noqa: E402

CONFIGS = {
    "lora": presets.lora(4, alpha=8),
    "lorta": presets.lorta(3, 4),
    "lonkr": presets.lonkr(2, 2),
    "fastfood": presets.with_projection(presets.lorta(3, 4), "fastfood", 0.5),
}


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def _vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=8, patch_size=4, num_channels=1, num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


def _vit_targets(model) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return ["query", "value"] if "query" in names else ["q_proj", "v_proj"]  # transformers < 5 / >= 5


def _run(model, adapter, batch, loss_of, steps: int = 3) -> None:
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    model.eval()


def _gpt2_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _vit_loss(model, batch):
    pixels, labels = batch
    return model(pixel_values=pixels, labels=labels).loss


@pytest.mark.parametrize("name", CONFIGS)
def test_gpt2_conv1d_c_attn(name, tmp_path) -> None:
    model = _gpt2()
    fresh = copy.deepcopy(model)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    adapter = tat.attach(model, CONFIGS[name], ["c_attn"])
    assert adapter.target_names == ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")
    assert adapter.plan.shapes == ((96, 32), (96, 32))  # Conv1D stores (in, out) = (32, 96)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base_logits)
    loss_before = _gpt2_loss(model, ids).item()
    _run(model, adapter, ids, _gpt2_loss)
    with torch.no_grad():
        assert _gpt2_loss(model, ids).item() < loss_before
        logits = model(input_ids=ids).logits
        adapter.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        adapter.unmerge()
    loaded = tat.load(fresh, adapter.save(tmp_path / "gpt2.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, logits)
    plain = loaded.merge_and_detach()
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["lora", "lorta", "fastfood"])
def test_vit_linear_query_value(name) -> None:
    model = _vit()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen))
    adapter = tat.attach(model, CONFIGS[name], _vit_targets(model))
    assert len(adapter.target_names) == 4
    _run(model, adapter, batch, _vit_loss)
    with torch.no_grad():
        logits = model(pixel_values=batch[0]).logits
        adapter.merge()
        torch.testing.assert_close(model(pixel_values=batch[0]).logits, logits, rtol=1e-5, atol=1e-5)
    adapter.detach()
    for (k, v), (k2, v2) in zip(reference.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_gpt2_gradient_checkpointing_matches() -> None:
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = _gpt2()
        adapter = tat.attach(model, presets.lorta(3, 4), ["c_attn", "c_fc"], seed=5)
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.add_(0.05)
        if checkpointing:
            options = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # newer transformers
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
            calls = []
            original = adapter.plan.delta_target
            adapter.plan.delta_target = lambda p, i, seen=calls, original=original: seen.append(i) or original(p, i)
        model.train()
        _gpt2_loss(model, ids).backward()
        if checkpointing:  # forward, the backward's recomputation of the forward, and the backward
            assert sorted(calls) == sorted(list(range(4)) * 3), calls
            assert adapter._backward_cache == {}  # released when the backward pass ended
        grads.append({n: p.grad.clone() for n, p in adapter.named_trainable_parameters()})
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, rtol=1e-4, atol=1e-6)
