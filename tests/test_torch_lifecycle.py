"""The adapter lifecycle v2, PEFT-style, over both methods and every preset: init is a no-op, a
train step changes only adapter tensors, merge equals the unmerged model, unmerge and detach are
exact, save/load round trips (modules_to_save included), concurrent forwards, failed loads that
leave the model untouched, eval-mode attach, tied weights, defaults and explicit functional forms."""

from __future__ import annotations

import json
import os
import threading

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, presets  # noqa: E402
from tensoradapt.glora import LayerChoice  # noqa: E402

METHODS = {
    "lora": presets.lora(2, alpha=4),
    "lokr": presets.lokr(2, factor=4),
    "krona": presets.krona(4),
    "loha": presets.loha(2),
    "lotr": presets.lotr(2),
    "lonkr": presets.lonkr(2, 2),
    "lorta": presets.lorta(3, 2),
    "dense": presets.dense(),
    "fastfood": presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5),
    "glora": GLoRAConfig(rank=2, seed=1),
}
SUPERLORA_TARGETS = ["embed", "query", "value", "conv"]
GLORA_TARGETS = ["query", "value"]


class Net(nn.Module):
    """Every supported module kind: Embedding (padding_idx), Linear (with and without bias) and a
    Conv1d with a non-'zeros' padding_mode, then a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12, padding_idx=0)
        self.query = nn.Linear(12, 12)
        self.value = nn.Linear(12, 12, bias=False)
        self.conv = nn.Conv1d(12, 12, 3, padding=1, padding_mode="reflect")
        self.classifier = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = torch.tanh(self.query(h)) + self.value(h)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.classifier(h.mean(1))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _ids(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 20, (batch, 7), generator=torch.Generator().manual_seed(batch))


def _targets(name: str) -> list[str]:
    return GLORA_TARGETS if name in ("glora", "lotr") else SUPERLORA_TARGETS  # LoTR stacks equal shapes


def _attach(model: nn.Module, name: str, **options):
    adapter = tat.attach(model, METHODS[name], _targets(name), **options)
    if name == "glora":
        adapter.set_configs(LayerChoice("lora", "vector", "lora", "none", "vector"))
    return adapter


def _perturb(adapter) -> None:
    with torch.no_grad():
        for i, p in enumerate(adapter.trainable_parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_lifecycle(name, tmp_path) -> None:
    model = _net()
    ids = _ids()
    before = _state(model)
    reference = model(ids)
    adapter = _attach(model, name, modules_to_save=["classifier"])
    assert isinstance(adapter, tat.BaseAdapter) and model.tensoradapt["default"] is adapter
    assert isinstance(adapter.num_params, int) and adapter.num_params > 0
    assert torch.equal(model(ids), reference)  # init is a no-op

    # a train step changes only the adapter's tensors (and the modules_to_save copy)
    base = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: p.detach().clone() for k, p in adapter.named_trainable_parameters()}
    assert any(k.startswith("modules_to_save.classifier.") for k in trainable)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in base.items())
    assert any(not torch.equal(v, dict(adapter.named_trainable_parameters())[k]) for k, v in trainable.items())
    _perturb(adapter)
    model.eval()
    adapted = model(ids)
    assert not torch.allclose(adapted, reference)
    unmerged_state = _state(model)

    # merge == unmerged; state_dict while merged reports the original weights; unmerge exact
    adapter.merge()
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
    assert _same_state(model, unmerged_state)
    adapter.unmerge()
    assert torch.equal(model(ids), adapted) and _same_state(model, unmerged_state)

    # save / load (file and folder) on a fresh model, with the trained head
    file = adapter.save(tmp_path / "a.safetensors")
    folder = adapter.save_pretrained(tmp_path / "folder").parent
    for where in (file, folder):
        fresh = _net()
        loaded = tat.load(fresh, where)
        assert type(loaded) is type(adapter) and loaded.modules_to_save == ("classifier",)
        fresh.eval()
        assert torch.equal(fresh(ids), adapted)
        loaded.detach()
        assert _same_state(fresh, before)

    # a merged state dict loaded into another adapted model does not count ΔW twice
    adapter.merge()
    merged_state = model.state_dict()
    other = _net()
    _attach(other, name, modules_to_save=["classifier"])
    other.load_state_dict(merged_state)
    other.eval()
    torch.testing.assert_close(other(ids), adapted, rtol=1e-5, atol=1e-5)

    # detach (from merged) restores the model bit for bit, the original head included
    returned = adapter.detach()
    assert returned is model and not hasattr(model, "tensoradapt")
    assert _same_state(model, before) and type(model.query) is nn.Linear
    assert torch.equal(model(ids), reference)


@pytest.mark.parametrize("name", list(METHODS))
def test_merge_and_detach_and_disabled(name) -> None:
    model = _net()
    ids = _ids()
    reference = model(ids)
    adapter = _attach(model, name)
    _perturb(adapter)
    model.eval()
    adapted = model(ids)
    with adapter.disabled():
        assert torch.equal(model(ids), reference)
    with pytest.warns(UserWarning) if name == "glora" and adapter.configs is None else _nothing():
        plain = adapter.merge_and_detach()
    assert not hasattr(plain, "tensoradapt") and type(plain.query) is nn.Linear
    torch.testing.assert_close(plain(ids), adapted, rtol=1e-5, atol=1e-5)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", list(METHODS))
def test_concurrent_no_grad_forwards_match_serial(name) -> None:
    model = _net()
    adapter = _attach(model, name)
    _perturb(adapter)
    model.eval()
    before = _state(model)
    inputs = [_ids(b) for b in range(1, 9)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with torch.no_grad():
                for rep in range(3):
                    for i, x in enumerate(inputs):
                        results[(worker, rep * len(inputs) + i)] = model(x)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (_, k), out in results.items():
        assert torch.equal(out, serial[k % len(inputs)])
    assert _same_state(model, before)
    adapter.detach()


def test_eval_mode_attach_is_deterministic_and_wrappers_take_the_mode() -> None:
    model = _net().eval()
    adapter = tat.attach(model, GLoRAConfig(rank=2), GLORA_TARGETS)
    assert not model.query.training and not adapter.training
    _perturb(adapter)
    ids = _ids()
    first = model(ids)
    for _ in range(3):
        assert torch.equal(model(ids), first)  # never samples: the largest choice
    train_model = _net().train()
    tat.attach(train_model, presets.lora(2), ["query"])
    assert train_model.query.training


def test_functional_forms_follow_each_module_s_settings() -> None:
    modules = [
        nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular"),
        nn.Conv2d(4, 6, 3, padding="same", padding_mode="replicate"),
        nn.Conv1d(4, 6, 2, padding="valid"),
        nn.Conv3d(2, 4, (1, 2, 3), padding=(0, 1, 1), padding_mode="reflect"),
    ]
    inputs = [torch.randn(2, 4, 9, 9), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 7), torch.randn(1, 2, 3, 5, 6)]
    for module, x in zip(modules, inputs, strict=True):
        holder = nn.Sequential(module)
        expected = holder(x)
        adapter = tat.attach(holder, presets.lokr(2, factor=2), ["0"])
        assert torch.equal(holder(x), expected)  # ΔW = 0 at init: exactly the module's own forward
        _perturb(adapter)
        out = holder(x)
        adapter.merge()
        torch.testing.assert_close(holder(x), out, rtol=1e-5, atol=1e-5)
        adapter.detach()
    with pytest.raises(TypeError, match="max_norm"):
        tat.attach(nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), presets.lora(1), ["0"])
    with pytest.raises(TypeError, match="is a ConvTranspose2d; adapters support"):
        tat.attach(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), presets.lora(1), ["0"])


def _gpt2(tied: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("config", [presets.lora(2), GLoRAConfig(rank=2)], ids=["superlora", "glora"])
def test_tied_weight_targets_are_refused_naming_both_modules(config) -> None:
    model = _gpt2(tied=True)
    before = _state(model)
    with pytest.raises(ValueError, match=r"target 'lm_head' shares its weight with module 'transformer\.wte'"):
        tat.attach(model, config, ["lm_head"])
    assert not hasattr(model, "tensoradapt") and _same_state(model, before)
    if isinstance(config, GLoRAConfig):
        return
    with pytest.raises(ValueError, match=r"target 'transformer\.wte' shares its weight with module 'lm_head'"):
        tat.attach(model, config, ["wte"])
    untied = _gpt2(tied=False)
    tat.attach(untied, config, ["lm_head"]).detach()


def test_default_targets_and_config() -> None:
    model = _gpt2(tied=True)
    adapter = tat.attach(model)
    assert adapter.target_names == ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")
    assert adapter.config == tat.default_config() == presets.lora(8)
    adapter.detach()
    names = tat.attach(model, targets="all-linear", exclude=["c_proj"]).target_names
    assert names == ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc")  # lm_head excluded
    model.tensoradapt.detach()
    assert tat.attach(_net(), presets.lora(1), "all-linear").target_names == ("query", "value")
    with pytest.raises(ValueError, match="adapter name"):
        tat.attach(_net(), presets.lora(1), ["query"], name="a.b")  # named adapters: tests/test_torch_named.py


def test_glora_half_precision_merge_overflow_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4)).half()
    with torch.no_grad():
        model[0].weight.fill_(60000.0)
    adapter = tat.attach(model, GLoRAConfig(rank=1), ["0"])
    adapter.set_configs(LayerChoice(A="scalar"))
    with torch.no_grad():
        adapter.layers[0]["A_d"].fill_(1.0)
        adapter.layers[0]["A_u"].fill_(1.0)
    before = _state(model)
    with pytest.raises(FloatingPointError, match="overflows"):
        adapter.merge()
    assert not adapter.merged and _same_state(model, before)


# ---------------------------------------------------------------- hostile adapter files
def _saved(tmp_path, name: str):
    model = _net()
    adapter = _attach(model, name, modules_to_save=["classifier"])
    _perturb(adapter)
    return adapter.save(tmp_path / f"{name}.safetensors")


def _rewrite(path, text: str | None = None, update=None, tensors=None) -> None:
    from tensoradapt.torch.files.read import read_adapter

    loaded, meta = read_adapter(path)
    for key, value in (update or {}).items():
        meta[key] = value
    text = json.dumps(meta) if text is None else text
    path.write_bytes(safetensors_torch.save(loaded if tensors is None else tensors,
                                            metadata={"format": "pt", "tensoradapt": text}))


def _meta(path) -> dict:
    return tat.read_metadata(path)


def _first(meta: dict, key: str, value) -> dict:
    """``meta`` with ``value`` at ``key`` of its first target record."""
    return {**meta, "targets": [{**meta["targets"][0], key: value}, *meta["targets"][1:]]}


def _cases(name: str):
    deep = "[" * 1000 + "]" * 1000
    cases = {
        "deep json": lambda m: json.dumps(m)[:-1] + f', "deep": {deep}}}',
        "5000-digit integer": lambda m: json.dumps(m)[:-1] + ', "seed2": ' + "9" * 5000 + "}",
        "seed Infinity": lambda m: json.dumps({**m, "seed": 0}).replace('"seed": 0', '"seed": Infinity'),
        "seed 1.5": {"seed": 1.5},
        "seed true": {"seed": True},
        "format_version 1.0": {"format_version": 1.0},
        "format_version true": {"format_version": True},
        "target named 1": lambda m: _first(m, "name", 1),
        "target named ''": lambda m: _first(m, "name", ""),
        "target named '1'": lambda m: _first(m, "name", "1"),
        "targets []": {"targets": []},
        "shapes as strings": lambda m: _first(m, "shape", ["12", "12"]),
        "parameters shape string": lambda m: {**m, "parameters": {k: "3" for k in m["parameters"]}},
        "config rank huge": lambda m: {**m, "config": {**m["config"], "rank": 10**30}},
        "config not object": {"config": [1]},
        "param_dtype int64": {"param_dtype": "int64"},
        "duplicate key": lambda m: json.dumps(m)[:-1] + ', "seed": 3}',
        "saved module missing": lambda m: {**m, "modules_to_save": [{**m["modules_to_save"][0], "name": "nope"}]},
    }
    if name == "glora":
        cases["has_bias no"] = lambda m: _first(m, "has_bias", "no")
        cases["has_bias flipped"] = lambda m: _first(m, "has_bias", False)
        cases["bad layer config"] = {"configs": [{"A": "cubic"}, {"A": "lora"}]}
        cases["config count"] = {"configs": [{"A": "lora"}]}
        cases["config rank too big"] = lambda m: {**m, "configs": [{**c, "rank": 99} for c in m["configs"]]}
    else:
        cases["kind changed"] = lambda m: _first(m, "kind", "conv1d")
    return cases


@pytest.mark.parametrize("name", ["lorta", "glora"])
def test_failed_loads_raise_adapter_file_error_and_leave_the_model_unchanged(name, tmp_path) -> None:
    good = _saved(tmp_path, name)
    original = good.read_bytes()
    for label, change in _cases(name).items():
        good.write_bytes(original)
        meta = _meta(good)
        if isinstance(change, dict):
            _rewrite(good, update=change)
        else:
            result = change(meta)
            _rewrite(good, text=result if isinstance(result, str) else json.dumps(result))
        model = _net()
        before = _state(model)
        with pytest.raises(tat.AdapterFileError, match=str(good.name)) as info:
            tat.load(model, good)
        assert not isinstance(info.value.__context__, RecursionError), label
        assert not hasattr(model, "tensoradapt") and _same_state(model, before), label
        assert type(model.query) is nn.Linear and all(p.requires_grad for p in model.parameters()), label
    # a tensor that disagrees with the config's plan
    good.write_bytes(original)
    from tensoradapt.torch.files.read import read_adapter

    tensors, meta = read_adapter(good)
    key = next(k for k in tensors if not k.startswith("modules_to_save."))
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    meta["parameters"][key] = list(tensors[key].shape)
    good.write_bytes(safetensors_torch.save(tensors, metadata={"format": "pt", "tensoradapt": json.dumps(meta)}))
    model = _net()
    before = _state(model)
    with pytest.raises(tat.AdapterFileError, match=str(good.name)):
        tat.load(model, good)
    assert not hasattr(model, "tensoradapt") and _same_state(model, before)


def test_a_stale_temporary_file_is_removed_by_the_next_save(tmp_path) -> None:
    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["query"])
    stale = tmp_path / ".a.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    other = tmp_path / ".b.safetensors.abc123.tmp"
    other.write_bytes(b"someone else's")
    adapter.save(tmp_path / "a.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.safetensors.abc123.tmp", "a.safetensors"]


def test_a_temporary_file_of_a_live_writer_is_kept(tmp_path) -> None:
    """Only a killed save's temporary file is stale: one whose process still runs (another rank
    saving the same path) is left alone; one of a finished process is removed."""
    import subprocess
    import sys

    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["query"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tmp_path / f".a.safetensors.{os.getppid()}.x1.tmp"
    gone = tmp_path / f".a.safetensors.{dead.pid}.x2.tmp"
    # another file's in-flight temporary that the glob .a.safetensors.*.tmp also matches
    other_file = tmp_path / f".a.safetensors.bak.safetensors.{dead.pid}.x3.tmp"
    for temp in (live, gone, other_file):
        temp.write_bytes(b"in flight")
    adapter.save(tmp_path / "a.safetensors")
    assert live.exists() and not gone.exists() and other_file.exists()


def test_concurrent_saves_of_one_path_never_fail(tmp_path) -> None:
    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["query"])
    errors: list[BaseException] = []

    def save() -> None:
        try:
            for _ in range(15):
                adapter.save(tmp_path / "a.safetensors")
        except BaseException as error:  # collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    tat.load(_net(), tmp_path / "a.safetensors")


def test_same_public_api_on_both_methods() -> None:
    members = ["num_params", "trainable_parameters", "named_trainable_parameters", "print_trainable_parameters",
               "summary", "merge", "unmerge", "detach", "merge_and_detach", "disabled", "save", "save_pretrained"]
    for name in ("lora", "glora"):
        adapter = _attach(_net(), name)
        for member in members:
            assert hasattr(adapter, member), (name, member)
        assert isinstance(adapter.num_params, int)
        assert sum(p.numel() for p in adapter.trainable_parameters()) == adapter.num_params
        assert adapter.summary().splitlines()[0].startswith("trainable params: ")


# ------------------------------------------------------------------------------ review fixes
def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_modules_to_save_keep_their_buffers(tmp_path) -> None:
    """BatchNorm's running statistics (buffers, not parameters) are saved and put back."""
    model = _bn_model()
    adapter = tat.attach(model, presets.lora(2), ["0"], modules_to_save=["1"])
    model.train()
    for _ in range(3):
        model(torch.randn(16, 8) + 3)
    model.eval()
    x = torch.randn(4, 8)
    expected = model(x)
    path = adapter.save(tmp_path / "bn.safetensors")
    fresh = _bn_model()
    tat.load(fresh, path)
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    assert fresh[1].num_batches_tracked.item() == 3


def test_load_checks_the_saved_module_type(tmp_path) -> None:
    model = _bn_model()
    path = tat.attach(model, presets.lora(2), ["0"], modules_to_save=["1"]).save(tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(tat.AdapterFileError, match="BatchNorm1d"):
        tat.load(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_disabled_while_merged_runs_the_base_model() -> None:
    model = _bn_model().eval()
    x = torch.randn(4, 8)
    base = model(x)
    adapter = tat.attach(model, presets.lora(2), ["0", "2"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.1)
    adapted = model(x)
    adapter.merge()
    weights = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    with adapter.disabled():
        assert torch.equal(model(x), base)
    assert adapter.merged and torch.allclose(model(x), adapted, atol=1e-6)
    assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[2].weight, weights[1])


def test_embedding_padding_row_is_never_updated() -> None:
    embedding = nn.Embedding(10, 4, padding_idx=0)
    model = nn.Sequential(embedding)
    original = embedding.weight.detach().clone()
    adapter = tat.attach(model, presets.lora(2), ["0"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.fill_(0.1)
    out = model(torch.tensor([0, 1]))
    assert torch.equal(out[0], original[0]) and not torch.equal(out[1], original[1])
    plain = adapter.merge_and_detach()
    assert torch.equal(plain[0].weight[0], original[0])


def test_a_fifo_is_not_an_adapter_file(tmp_path) -> None:
    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(tat.AdapterFileError, match="not a regular file"):
        tat.read_metadata(fifo)
