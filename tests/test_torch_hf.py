"""Hugging Face conventions: an adapted model's save_pretrained writes the adapter folder only,
Trainer checkpoints are adapter-only and resume from it, full state dicts load into plain models
with the base model's keys, and neither PEFT nor transformers mistakes the folder for theirs."""

from __future__ import annotations

import copy
import logging
import os
import pickle

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, presets  # noqa: E402
from tensoradapt.glora import LayerChoice  # noqa: E402

VOCAB = 64


def _gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


MODELS = {"gpt2": (_gpt2, ["c_attn"]), "llama": (_llama, ["q_proj", "v_proj"])}


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


def _perturb(adapter: tat.BaseAdapter, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------- save_pretrained
@pytest.mark.parametrize("kind", MODELS)
def test_model_save_pretrained_writes_the_adapter_folder_only(kind, tmp_path) -> None:
    make, targets = MODELS[kind]
    model = make()
    adapter = tat.attach(model, presets.lorta(3, 2), targets)
    _perturb(adapter)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "out")
    assert _files(tmp_path / "out") == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    fresh = make()
    tat.load(fresh, tmp_path / "out")
    assert torch.equal(_logits(fresh), expected)
    # the hook goes with the last adapter: the class's own save_pretrained again
    assert "save_pretrained" in model.__dict__
    adapter.detach()
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "plain")
    assert "model.safetensors" in _files(tmp_path / "plain")


def test_the_hook_follows_copies_and_leaves_with_merge_and_detach(tmp_path) -> None:
    model = _gpt2()
    adapter = tat.attach(model, presets.lora(2), ["c_attn"])
    _perturb(adapter)
    clone = copy.deepcopy(model)
    _perturb(clone.tensoradapt["default"], seed=5)
    clone.save_pretrained(tmp_path / "clone")  # the copy's hook saves the copy's adapter
    restored = pickle.loads(pickle.dumps(model))
    restored.save_pretrained(tmp_path / "pickled")
    fresh, other = _gpt2(), _gpt2()
    tat.load(fresh, tmp_path / "clone")
    tat.load(other, tmp_path / "pickled")
    assert torch.equal(_logits(fresh), _logits(clone)) and not torch.equal(_logits(fresh), _logits(model))
    assert torch.equal(_logits(other), _logits(model))
    plain = adapter.merge_and_detach()
    assert "save_pretrained" not in plain.__dict__ and not hasattr(plain, "tensoradapt")
    plain.save_pretrained(tmp_path / "merged")  # the full merged model, transformers' own format
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=1e-5, atol=1e-5)


def test_several_adapters_follow_peft_layout(tmp_path) -> None:
    model = _gpt2()
    a = tat.attach(model, presets.lora(2), ["c_attn"])
    b = tat.attach(model, presets.lokr(2, factor=2), ["c_proj"], name="b")
    _perturb(a, 1)
    _perturb(b, 2)
    model.save_pretrained(tmp_path)
    assert "adapter_model.safetensors" in _files(tmp_path) and _files(tmp_path / "b")[-1] == "adapter_model.safetensors"
    fresh = _gpt2()
    tat.load(fresh, tmp_path)
    tat.load(fresh, tmp_path, name="b")
    assert torch.equal(_logits(fresh), _logits(model))
    same = _gpt2()  # in place, as a Trainer resume does
    tat.attach(same, presets.lora(2), ["c_attn"])
    tat.attach(same, presets.lokr(2, factor=2), ["c_proj"], name="b")
    assert tat.hf.load_checkpoint(same, tmp_path) == ("default", "b")
    assert torch.equal(_logits(same), _logits(model))
    b.detach()
    assert "save_pretrained" in model.__dict__  # one adapter left
    a.detach()
    assert "save_pretrained" not in model.__dict__


def test_save_pretrained_arguments(tmp_path) -> None:
    model = _gpt2()
    adapter = tat.attach(model, presets.lora(2), ["c_attn"])
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ValueError, match=r"safetensors only"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match=r"push_to_hub is not supported"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(ValueError, match=r"no variants"):
        model.save_pretrained(tmp_path / "x", variant="fp16")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['colour'\]"):
        model.save_pretrained(tmp_path / "x", colour=1)
    model.save_pretrained(tmp_path / "ok", safe_serialization=True, max_shard_size="1GB")
    # state_dict= (what Trainer passes under DeepSpeed / FSDP): its adapter tensors are the ones written
    state = {k: (v * 0 + 0.5 if k.startswith("tensoradapt.") else v) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=state)
    fresh = _gpt2()
    loaded = tat.load(fresh, tmp_path / "sd")
    assert all(bool((p == 0.5).all()) for p in loaded.trainable_parameters())
    assert not all(bool((p == 0.5).all()) for p in adapter.trainable_parameters())


# ---------------------------------------------------------------------------------- full state dicts
@pytest.mark.parametrize("kind", MODELS)
def test_full_state_dict_has_the_base_models_keys(kind, tmp_path) -> None:
    make, targets = MODELS[kind]
    model = make()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = tat.attach(model, presets.lorta(3, 2), targets)
    _perturb(adapter)
    adapter.merge()  # while merged too: the weights before the merge
    state = model.state_dict()
    assert [k for k in state if not k.startswith("tensoradapt.")] == list(base)
    assert not any(".base_layer." in k for k in state)
    plain = make()
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()
    result = plain.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys
    assert all(k.startswith("tensoradapt.") for k in result.unexpected_keys)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.items())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"tensoradapt\.default\."):
        make().load_state_dict(state)  # strict: a clear failure, never a silent drop
    # and back into an adapted model, strictly, in both key forms
    other = make()
    tat.attach(other, presets.lorta(3, 2), targets)
    other.load_state_dict(state)
    adapter.unmerge()
    assert torch.equal(_logits(other), _logits(model))
    old_form = {}
    for k, v in state.items():
        module = k.rsplit(".", 1)[0]
        wrapped = any(module.endswith(t) for t in targets)
        old_form[f"{module}.base_layer.{k.rsplit('.', 1)[1]}" if wrapped else k] = v
    third = make()
    tat.attach(third, presets.lorta(3, 2), targets)
    third.load_state_dict(old_form)
    assert torch.equal(_logits(third), _logits(model))


@pytest.mark.parametrize("kind", MODELS)
def test_full_save_of_an_adapted_model_never_reinitialises(kind, tmp_path, caplog) -> None:
    make, targets = MODELS[kind]
    model = make()
    reference = _logits(model)
    adapter = tat.attach(model, presets.lora(2), targets)
    _perturb(adapter)
    type(model).save_pretrained(model, tmp_path)  # the class's own (full) save, bypassing the hook
    with caplog.at_level(logging.WARNING):
        loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), reference)  # every base weight is there: nothing re-initialised
    assert "MISSING" not in caplog.text


def test_peft_and_transformers_refuse_the_adapter_folder(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = _gpt2()
    tat.attach(model, presets.lora(2), ["c_attn"])
    model.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="peft_type"):
        peft.PeftModel.from_pretrained(_gpt2(), tmp_path)
    with pytest.raises(KeyError, match="base_model_name_or_path"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises((OSError, KeyError)):
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert not tat.hf.holds_adapter(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------- Trainer
class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _adapted(config=None) -> transformers.GPT2LMHeadModel:
    model = _gpt2().train()
    tat.attach(model, config or presets.lorta(3, 4), ["c_attn"])
    return model


def _args(output, **extra) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(output, per_device_train_batch_size=4, max_steps=4, save_steps=2,
                                          logging_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0, **extra)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _folder_size(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)))


def test_trainer_checkpoints_are_adapter_only_and_resume(tmp_path) -> None:
    out = tmp_path / "run"
    model = _adapted()
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=_Data())
    trainer.train()
    losses = _losses(trainer)
    checkpoint = out / "checkpoint-2"
    files = _files(checkpoint)
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files and "config.json" not in files
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert os.path.getsize(checkpoint / "adapter_model.safetensors") < full / 10
    assert _folder_size(checkpoint) < full / 2  # optimizer state and Trainer's files included
    trainer.save_model()
    fresh = _gpt2()
    tat.load(fresh, out)
    model.eval()
    assert torch.equal(_logits(fresh), _logits(model))  # the trained model's outputs, from the base + folder

    # without the one line, Trainer cannot read the folder: it fails, it never trains from scratch silently
    with pytest.raises(ValueError, match=r"checkpoint"):
        transformers.Trainer(model=_adapted(), args=_args(out), train_dataset=_Data()).train(
            resume_from_checkpoint=str(checkpoint))

    resumed_model = _adapted()
    resumed = tat.use_adapter_checkpoints(transformers.Trainer(model=resumed_model, args=_args(out),
                                                               train_dataset=_Data()))
    assert tat.use_adapter_checkpoints(resumed) is resumed
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert _losses(resumed)[2:] == pytest.approx(losses[2:], rel=1e-6)  # the trajectory continues
    for (name, p), q in zip(model.tensoradapt.named_trainable_parameters(),
                            resumed_model.tensoradapt.trainable_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # a resume that skipped the adapter tensors (or the optimizer state) ends elsewhere
    skipped_model = _adapted()
    skipped = transformers.Trainer(model=skipped_model, args=_args(out), train_dataset=_Data())
    skipped._load_from_checkpoint = lambda *args, **kwargs: None
    skipped.train(resume_from_checkpoint=str(checkpoint))
    assert not torch.allclose(skipped_model.tensoradapt.trainable_parameters()[0],
                              model.tensoradapt.trainable_parameters()[0])


def test_load_best_model_at_end(tmp_path) -> None:
    model = _adapted()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # the worst loss is "best": checkpoint-2
    trainer = tat.use_adapter_checkpoints(transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                                               eval_dataset=_Data()))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    reference = _gpt2()
    saved = tat.load(reference, best)
    for p, q in zip(saved.trainable_parameters(), model.tensoradapt.trainable_parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_checkpoint_refuses_what_does_not_fit(tmp_path) -> None:
    model = _adapted()
    _perturb(model.tensoradapt["default"])
    model.save_pretrained(tmp_path)
    other = _adapted(presets.lora(2))
    before = [p.clone() for p in other.tensoradapt.trainable_parameters()]
    with pytest.raises(tat.AdapterFileError, match=r"does not fit the attached adapter 'default'.*'config'"):
        tat.hf.load_checkpoint(other, tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(before, other.tensoradapt.trainable_parameters(), strict=True))
    extra = _adapted()
    tat.attach(extra, presets.lora(2), ["c_proj"], name="b")
    with pytest.raises(FileNotFoundError, match=r"for the attached adapter 'b'"):
        tat.hf.load_checkpoint(extra, tmp_path)
    with pytest.raises(RuntimeError, match=r"no tensoradapt adapter attached"):
        tat.hf.load_checkpoint(_gpt2(), tmp_path)
    same = _adapted()
    same.tensoradapt.merge()
    with pytest.raises(RuntimeError, match=r"is merged"):
        tat.hf.load_checkpoint(same, tmp_path)
    same.tensoradapt.unmerge()
    assert tat.hf.load_checkpoint(same, tmp_path) == ("default",)
    assert all(torch.equal(p, q) for p, q in zip(same.tensoradapt.trainable_parameters(),
                                                 model.tensoradapt.trainable_parameters(), strict=True))
    with pytest.raises(TypeError, match=r"needs a transformers.Trainer"):
        tat.use_adapter_checkpoints(object())


def test_glora_through_model_save_pretrained(tmp_path) -> None:
    model = _gpt2()
    adapter = tat.attach(model, GLoRAConfig(rank=2), ["c_attn"])
    _perturb(adapter)
    model.save_pretrained(tmp_path)
    assert tat.read_metadata(tmp_path)["method"] == "glora"
    fresh = _gpt2()
    tat.load(fresh, tmp_path)
    assert torch.equal(_logits(fresh), _logits(model))
    same = _gpt2()
    restored = tat.attach(same, GLoRAConfig(rank=2), ["c_attn"])
    tat.hf.load_checkpoint(same, tmp_path)
    assert torch.equal(_logits(same), _logits(model)) and restored.configs is None
    adapter.set_configs(LayerChoice(A="lora", B="none", C="none", D="vector", E="none", rank=1))
    model.save_pretrained(tmp_path / "fixed")
    tat.hf.load_checkpoint(same, tmp_path / "fixed")
    assert restored.configs == adapter.configs and torch.equal(_logits(same), _logits(model))
