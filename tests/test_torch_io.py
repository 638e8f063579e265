"""Adapter files: atomic writes and one test per load error."""

from __future__ import annotations

import copy
import json
import os
import struct

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import presets  # noqa: E402
from tensoradapt.torch.files.read import read_adapter  # noqa: E402


def _model(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))


@pytest.fixture
def saved(tmp_path):
    model = _model()
    adapter = tat.attach(model, presets.lorta(3, 2), ["0", "2"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.1)
    return adapter.save(tmp_path / "a.safetensors")


def _rewrite(path, tensors=None, meta_update=None, raw_meta=None):
    loaded, meta = read_adapter(path)
    tensors = loaded if tensors is None else tensors
    meta.update(meta_update or {})
    text = json.dumps(meta) if raw_meta is None else raw_meta
    path.write_bytes(safetensors_torch.save(tensors, metadata={"format": "pt", "tensoradapt": text}))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no adapter file at .*nope.safetensors"):
        tat.load(_model(), tmp_path / "nope.safetensors")


def test_wrong_format_version(saved) -> None:
    _rewrite(saved, meta_update={"format_version": 99})
    with pytest.raises(tat.AdapterFileError, match=r"format_version 99; this tensoradapt reads version 1.*newer"):
        tat.load(_model(), saved)


def test_not_an_adapter(tmp_path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors_torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(tat.AdapterFileError, match=r"without tensoradapt metadata"):
        tat.load(_model(), path)
    _rewrite_path = tmp_path / "other.safetensors"
    _rewrite_path.write_bytes(safetensors_torch.save({"w": torch.zeros(2)},
                                                     metadata={"tensoradapt": json.dumps({"format": "lycoris"})}))
    with pytest.raises(tat.AdapterFileError, match=r"has format 'lycoris'"):
        tat.load(_model(), _rewrite_path)


def test_model_with_other_targets(saved) -> None:
    other = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(tat.AdapterFileError, match=r"targets modules the model does not have: \['2'\]"):
        tat.load(other, saved)


def test_model_with_other_shapes(saved) -> None:
    with pytest.raises(tat.AdapterFileError,
                       match=r"shapes differ: 0: file linear \(8, 4\) \(weight \(8, 4\)\) vs model linear \(16, 4\)"):
        tat.load(_model(width=16), saved)


def test_dtype_mismatch(saved) -> None:
    tensors, _ = read_adapter(saved)
    _rewrite(saved, tensors={k: v.double() for k, v in tensors.items()})
    with pytest.raises(tat.AdapterFileError,
                       match=r"dtype mismatch, tensor .* is float64 but the adapter's parameters are float32"):
        tat.load(_model(), saved)


def test_shape_mismatch_inside_the_file(saved) -> None:
    tensors, _ = read_adapter(saved)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(1, 1, 1)
    _rewrite(saved, tensors=tensors)
    with pytest.raises(tat.AdapterFileError, match=f"tensor '{name}' has shape \\[1, 1, 1\\] but the metadata says"):
        tat.load(_model(), saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header-length", "bad-json", "bad-metadata-json", "empty"])
def test_corrupted_file(saved, damage) -> None:
    data = saved.read_bytes()
    if damage == "truncate":
        saved.write_bytes(data[:-10])
    elif damage == "garbage":
        saved.write_bytes(b"\x00" * len(data))
    elif damage == "header-length":
        saved.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    elif damage == "bad-json":
        saved.write_bytes(data[:8] + b"[" + data[9:])
    elif damage == "bad-metadata-json":
        _rewrite(saved, raw_meta="{not json")
    else:
        saved.write_bytes(b"")
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(tat.AdapterFileError, match=r"corrupted|not JSON|not a safetensors"):
        tat.load(model, saved)
    assert not hasattr(model, "tensoradapt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plan_mismatch(saved) -> None:
    _, meta = read_adapter(saved)
    meta["config"]["rank"] = 3  # the stored tensors have rank 2
    _rewrite(saved, meta_update={"config": meta["config"]})
    with pytest.raises(tat.AdapterFileError, match=r"do not match the plan"):
        tat.load(_model(), saved)


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(saved, monkeypatch) -> None:
    old = saved.read_bytes()
    model = _model()
    adapter = tat.attach(model, presets.lora(1), ["0"])

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match=r"disk full"):
        adapter.save(saved)
    assert saved.read_bytes() == old
    assert sorted(p.name for p in saved.parent.iterdir()) == ["a.safetensors"]


def test_save_path_errors(tmp_path) -> None:
    adapter = tat.attach(_model(), presets.lora(1), ["0"])
    with pytest.raises(ValueError, match=r"end in .safetensors"):
        adapter.save(tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        adapter.save(tmp_path / "missing" / "a.safetensors")


def test_load_into_a_model_that_already_has_an_adapter(saved) -> None:
    model = _model()
    tat.attach(model, presets.lora(1), ["4"])
    with pytest.raises(RuntimeError, match=r"already has an attribute 'tensoradapt'"):
        tat.load(model, saved)


def test_same_matrix_shape_but_other_module_kind(tmp_path) -> None:
    conv = nn.Sequential(nn.Conv2d(4, 8, 3))
    adapter = tat.attach(conv, presets.lora(1), ["0"])
    path = adapter.save(tmp_path / "conv.safetensors")
    with pytest.raises(tat.AdapterFileError, match=r"file weight \(8, 36\) \(weight \(8, 4, 3, 3\)\) vs model linear"):
        tat.load(nn.Sequential(nn.Linear(36, 8)), path)
    with pytest.raises(tat.AdapterFileError, match=r"vs model weight \(8, 36\) \(weight \(8, 9, 2, 2\)\)"):
        tat.load(nn.Sequential(nn.Conv2d(9, 8, 2)), path)


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"generator_id": "other/2"}, "buffer generator 'other/2'"),
        ({"targets": []}, "target list is \\[\\] \\(a non-empty list needed\\)"),
        ({"seed": "x"}, "seed is 'x', not a non-negative 64-bit integer"),
        ({"parameters": {"g0.split1.core": 3}}, "corrupted"),
    ],
)
def test_bad_metadata_fields(saved, update, match) -> None:
    _, meta = read_adapter(saved)
    if "parameters" in update:
        update = {"parameters": {**meta["parameters"], **update["parameters"]}}
    _rewrite(saved, meta_update=update)
    with pytest.raises(tat.AdapterFileError, match=match):
        tat.load(_model(), saved)


def test_duplicate_targets_and_metadata_type(saved) -> None:
    _, meta = read_adapter(saved)
    _rewrite(saved, meta_update={"targets": [meta["targets"][0], meta["targets"][0]]})
    with pytest.raises(tat.AdapterFileError, match="repeats a name"):
        tat.load(_model(), saved)


def test_saved_file_gets_the_usual_mode(tmp_path) -> None:
    adapter = tat.attach(_model(), presets.lora(1), ["0"])
    umask = os.umask(0)
    os.umask(umask)
    path = adapter.save(tmp_path / "m.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    os.chmod(path, 0o640)
    adapter.save(path)  # replacing keeps the existing file's mode
    assert path.stat().st_mode & 0o777 == 0o640
