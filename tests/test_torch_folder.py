"""Adapter folders: adapter_model.safetensors + adapter_config.json + README.md, strict checks of the
config against the file's metadata, named adapters in subfolders, atomic writes, GLoRA likewise."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, presets  # noqa: E402
from tensoradapt.glora import LayerChoice  # noqa: E402
from tensoradapt.torch.files import read as files_read  # noqa: E402


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
    return Net()


def _x() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def _perturb(adapter: tat.BaseAdapter, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def folder(tmp_path):
    model = _net()
    adapter = tat.attach(model, presets.lorta(3, 2), ["q", "v"], modules_to_save=["head"])
    _perturb(adapter, 1)
    adapter.save_pretrained(tmp_path / "run")
    with torch.no_grad():
        expected = model(_x())
    return tmp_path / "run", expected


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _write_config(folder, data) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(data))


def test_folder_has_the_three_files_and_loads_back(folder) -> None:
    path, expected = folder
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = _config(path)
    metadata = tat.read_metadata(path / "adapter_model.safetensors")
    assert config.pop("library") == "tensoradapt" and "peft_type" not in config
    assert config == metadata  # the same facts as the authoritative safetensors metadata
    assert metadata["targets"][0] == {"name": "q", "kind": "linear", "shape": [8, 8], "weight_shape": [8, 8]}
    assert metadata["method"] == "superlora" and metadata["format_version"] == 1 and "library_version" in metadata
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: tensoradapt\n") and "tat.load(" in card
    trainable = sum(torch.Size(s).numel() for s in metadata["parameters"].values())
    assert f"trainable parameters: {trainable:,}" in card and "`q`: linear 8×8" in card and "['head']" in card
    fresh = _net()
    loaded = tat.load(fresh, path)
    assert loaded.modules_to_save == ("head",)
    with torch.no_grad():
        assert torch.equal(fresh(_x()), expected)


def test_a_folder_without_adapter_config_still_loads(folder) -> None:
    path, expected = folder
    (path / "adapter_config.json").unlink()
    (path / "README.md").unlink()
    fresh = _net()
    tat.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(_x()), expected)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(seed=c["seed"] + 1), "seed"),
        (lambda c: c.update(extra=1), "extra"),
        (lambda c: c.pop("targets"), "targets"),
        (lambda c: c["config"].update(rank=float(c["config"]["rank"])), "config"),  # 2 vs 2.0: JSON types count
        (lambda c: c["targets"].reverse(), "targets"),
    ],
)
def test_config_that_disagrees_with_the_file_is_refused(folder, edit, field) -> None:
    path, _ = folder
    config = _config(path)
    edit(config)
    _write_config(path, config)
    model = _net()
    before = _state(model)
    with pytest.raises(tat.AdapterFileError, match=rf"adapter_config.json' disagrees with .*\['{field}'\]"):
        tat.load(model, path)
    assert _same(_state(model), before) and not hasattr(model, "tensoradapt")
    with pytest.raises(tat.AdapterFileError, match=r"disagrees"):
        tat.read_metadata(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b'{"library": "tensoradapt", "seed": NaN}', "not valid JSON"),
        (b'{"library": "tensoradapt", "library": "tensoradapt"}', "not valid JSON"),
        (b"[" * 40 + b"]" * 40, "nests deeper"),
        (b'{"library": "tensoradapt", "x": "\xff"}', "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"peft_type": "LORA", "r": 8}', "is a PEFT adapter config \\(peft_type 'LORA'\\).*peft.PeftModel"),
        (b'{"library": "other"}', "has library 'other', expected 'tensoradapt'"),
        (b'{"seed": 1}', "has library None"),
        (b"{", "not valid JSON"),
    ],
)
def test_hostile_or_foreign_adapter_config(folder, text, match) -> None:
    path, _ = folder
    (path / "adapter_config.json").write_bytes(text)
    model = _net()
    with pytest.raises(tat.AdapterFileError, match=match) as error:
        tat.load(model, path)
    assert "adapter_config.json" in str(error.value) and not hasattr(model, "tensoradapt")


def test_adapter_config_that_is_not_a_file_or_too_big(folder, monkeypatch) -> None:
    path, _ = folder
    config = path / "adapter_config.json"
    monkeypatch.setattr(files_read, "MAX_CONFIG_BYTES", 64)
    with pytest.raises(tat.AdapterFileError, match=r"adapter_config.json' is corrupted: .* bytes, over the limit"):
        tat.load(_net(), path)
    monkeypatch.undo()
    config.unlink()
    config.mkdir()
    with pytest.raises(tat.AdapterFileError, match=r"adapter_config.json' is not a regular file"):
        tat.load(_net(), path)
    config.rmdir()
    config.symlink_to(path / "missing.json")
    with pytest.raises(tat.AdapterFileError, match=r"not a regular file"):
        tat.load(_net(), path)


def test_base_model_is_recorded_and_checked(tmp_path) -> None:
    model = _net()
    model.config = type("Config", (), {"_name_or_path": "org/base-model", "_commit_hash": "0123abcd"})()
    adapter = tat.attach(model, presets.lora(2), ["q"])
    adapter.save_pretrained(tmp_path)
    metadata = tat.read_metadata(tmp_path)
    assert metadata["base_model"] == {"name_or_path": "org/base-model", "commit": "0123abcd"}
    assert _config(tmp_path)["base_model"] == metadata["base_model"]
    card = (tmp_path / "README.md").read_text()
    assert 'base_model: "org/base-model"' in card.split("\n---", 1)[0] and "0123abcd" in card
    tensors, meta = files_read.read_adapter(tmp_path)
    meta["base_model"] = {"name_or_path": 3}
    (tmp_path / "adapter_config.json").unlink()
    (tmp_path / "adapter_model.safetensors").write_bytes(
        safetensors_torch.save(tensors, metadata={"format": "pt", "tensoradapt": json.dumps(meta)}))
    with pytest.raises(tat.AdapterFileError, match=r"base_model is \{'name_or_path': 3\}"):
        tat.load(_net(), tmp_path)


def test_named_adapters_live_in_subfolders(tmp_path) -> None:
    model = _net()
    a = tat.attach(model, presets.lora(2), ["q"])
    b = tat.attach(model, presets.lokr(2, factor=2), ["q", "v"], name="b")
    _perturb(a, 1)
    _perturb(b, 2)
    tat.hf.save_pretrained(model, tmp_path)  # what model.save_pretrained does on a transformers model
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    assert tat.read_metadata(tmp_path)["config"] == a.config.to_dict()
    assert tat.read_metadata(tmp_path, name="b")["config"] == b.config.to_dict()
    fresh = _net()
    tat.load(fresh, tmp_path)
    tat.load(fresh, tmp_path, name="b")
    assert fresh.tensoradapt.names == ("default", "b")
    with torch.no_grad():
        assert torch.equal(fresh(_x()), model(_x()))
    only_b = _net()
    tat.load(only_b, tmp_path, name="b")
    with torch.no_grad():
        a.detach()
        assert torch.equal(only_b(_x()), model(_x()))
    # a folder holding only a named adapter: the error says which names there are
    lone = tmp_path / "lone"
    tat.hf.save_pretrained(model, lone)  # adapter "b" alone: written to lone/b/
    assert not (lone / "adapter_model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"no adapter file at .*lone/adapter_model.safetensors.*\['b'\].*name"):
        tat.load(_net(), lone)
    # a name the folder lacks is a typo, not the root adapter under a new name; the root's file is explicit
    typo = _net()
    with pytest.raises(FileNotFoundError, match=r"no adapter named 'bb'.*\['b'\].*adapter_model.safetensors"):
        tat.load(typo, tmp_path, name="bb")
    assert not hasattr(typo, "tensoradapt")
    tat.load(typo, tmp_path / "adapter_model.safetensors", name="bb")
    assert typo.tensoradapt.names == ("bb",)
    with pytest.raises(ValueError, match=r"Python identifier"):
        tat.load(_net(), lone, name="../b")


def test_glora_folder(tmp_path) -> None:
    model = _net()
    adapter = tat.attach(model, GLoRAConfig(rank=3), ["q", "v"])
    _perturb(adapter, 4)
    adapter.set_configs(LayerChoice(A="lora", B="vector", C="none", D="none", E="vector", rank=2))
    model.eval()
    with torch.no_grad():
        expected = model(_x())
    adapter.save_pretrained(tmp_path)
    config = _config(tmp_path)
    assert config["method"] == "glora" and config["library"] == "tensoradapt" and config["configs"][0]["A"] == "lora"
    assert "glora" in (tmp_path / "README.md").read_text()
    fresh = _net()
    loaded = tat.load(fresh, tmp_path)
    fresh.eval()
    assert loaded.configs == adapter.configs
    with torch.no_grad():
        assert torch.equal(fresh(_x()), expected)
    config["configs"][0]["A"] = "none"
    _write_config(tmp_path, config)
    with pytest.raises(tat.AdapterFileError, match=r"disagrees .*\['configs'\]"):
        tat.load(_net(), tmp_path)


def test_user_readme_is_kept_and_ours_is_refreshed(tmp_path) -> None:
    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["q"])
    (tmp_path / "README.md").write_text("# my notes\n")
    adapter.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    (tmp_path / "README.md").unlink()
    adapter.save_pretrained(tmp_path)
    assert "rank" in (tmp_path / "README.md").read_text() and "`q`: linear 8×8" in (tmp_path / "README.md").read_text()
    adapter.detach()
    tat.attach(model, presets.lora(2), ["v"]).save_pretrained(tmp_path)
    assert "`v`: linear 8×8" in (tmp_path / "README.md").read_text()


def test_every_write_is_atomic_and_a_failure_leaves_a_loadable_folder(tmp_path, monkeypatch) -> None:
    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["q", "v"])
    real = os.replace
    for failing in range(3):  # the rename of the .safetensors file, of adapter_config.json, of README.md
        _perturb(adapter, 2 * failing)
        adapter.save_pretrained(tmp_path)
        with torch.no_grad():
            old = model(_x())
            _perturb(adapter, 2 * failing + 1)
            new = model(_x())
        calls = []

        def flaky(src, dst, calls=calls, failing=failing):
            calls.append(dst)
            if len(calls) == failing + 1:
                raise OSError("disk full")
            return real(src, dst)

        monkeypatch.setattr(os, "replace", flaky)
        with pytest.raises(OSError, match="disk full"):
            adapter.save_pretrained(tmp_path)
        monkeypatch.setattr(os, "replace", real)
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        fresh = _net()
        tat.load(fresh, tmp_path)  # never an old adapter_config.json beside a new file, or the reverse
        with torch.no_grad():
            assert torch.equal(fresh(_x()), old if failing == 0 else new), failing
        assert (tmp_path / "adapter_config.json").exists() == (failing == 2)  # README.md failed: config written


def test_save_pretrained_from_a_state_dict(tmp_path) -> None:
    model = _net()
    adapter = tat.attach(model, presets.lora(2), ["q"], modules_to_save=["head"])
    state = model.state_dict()
    keys = adapter.state_dict_keys()
    assert keys["g0.split1.factor0"] == "tensoradapt.default.params.g0__split1__factor0"
    assert keys["modules_to_save.head.weight"] == "tensoradapt.default.saved_modules.head.weight"
    assert set(keys.values()) <= set(state)
    changed = {k: (v + 1 if k.startswith("tensoradapt.") else v) for k, v in state.items()}
    adapter.save_pretrained(tmp_path, state_dict=changed)
    tensors, _ = files_read.read_adapter(tmp_path)
    for name, key in keys.items():
        assert torch.equal(tensors[name], changed[key]), name
    with pytest.raises(ValueError, match=r"state_dict lacks the tensors of adapter 'default'"):
        adapter.save_pretrained(tmp_path, state_dict={k: v for k, v in state.items() if "factor0" not in k})
    wrong = dict(state)
    wrong["tensoradapt.default.params.g0__split1__factor0"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"has shape \(3,\), but adapter 'default' has"):
        adapter.save_pretrained(tmp_path, state_dict=wrong)
    with pytest.raises(TypeError, match=r"state_dict must be a mapping"):
        adapter.save_pretrained(tmp_path, state_dict=[1])
    with pytest.raises(ValueError, match=r"is a file"):
        adapter.save_pretrained(tmp_path / "adapter_model.safetensors")
