"""Buffer generators carried by torch adapters and their files (docs/math.md D6, issue 14).

Generator 2 is the default; ``attach(..., generator=...)`` picks one, the adapter and its plan use
it, files record it as ``generator_id`` and ``load`` rebuilds with the recorded one.  The committed
fixtures ``tests/data/{fastfood,shuffle}_v1*.safetensors`` were written by tensoradapt before
generator 2 became the default (``tests/data/make_v1_fixtures.py``): loading them must reproduce
their stored ΔW bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, buffers  # noqa: E402
from tensoradapt.torch.files.read import read_adapter  # noqa: E402

from .data.make_v1_fixtures import Tiny, build, configs  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
V1, V2 = buffers.GENERATOR_V1, buffers.GENERATOR_V2
KINDS = ("fastfood", "shuffle")
#: sha256 of the float32 bytes of each fixture's ΔW, as the code before the change computed them
DELTA_SHA256 = {
    "fastfood": {"up": "80cc2f92474af20980189f82a4ae1eae39937ad8e6f951fa022ce70452c9959b",
                 "down": "cf3f16a6b112f4e067d4160304d0e1e880cb252c4c970fbf041472dbbb7b94ed"},
    "shuffle": {"up": "2077514e08551cf9fc919a91b9f4654dee507691835b7154502f74bbb12c1191",
                "down": "aa5fd91eaf1484218a4172f01f5493c74cf317d683924a1365c5deb248a5d93b"},
}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def _x() -> torch.Tensor:
    return torch.linspace(-1, 1, 18).reshape(3, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_committed_v1_file_loads_and_reproduces_its_delta_bit_for_bit(kind: str) -> None:
    expected = safetensors_torch.load_file(str(DATA / f"{kind}_v1_delta.safetensors"))
    assert {n: _sha(t) for n, t in expected.items()} == DELTA_SHA256[kind]  # the frozen values themselves
    assert tat.read_metadata(DATA / f"{kind}_v1.safetensors")["generator_id"] == V1
    model = Tiny()
    adapter = tat.load(model, DATA / f"{kind}_v1.safetensors")
    assert adapter.generator_id == V1 and adapter.plan.generator_id == V1
    for g in range(2):  # the plan's maps are generator 1's host buffers (golden values: tests/test_buffers.py)
        op = adapter.plan.projection(g)
        assert op.generator == V1
        if kind == "fastfood":
            np.testing.assert_array_equal(op.buffers["permutation"],
                                          buffers.permutation(op.length, 0, g, "fastfood.permutation"))
        else:
            np.testing.assert_array_equal(op.permutation, buffers.permutation(op.n, 0, g, "shuffle"))
    deltas = adapter.deltas()
    assert set(deltas) == {"up", "down"}
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32 and torch.equal(delta, expected[name]), name
    # the forward uses that ΔW: W + ΔW on the base layers
    merged = Tiny()
    merged.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                            if "tensoradapt" not in k})
    with torch.no_grad():
        merged.up.weight += expected["up"]
        merged.down.weight += expected["down"]
    torch.testing.assert_close(model(_x()), merged(_x()), rtol=1e-6, atol=1e-6)
    # the default generator would give another ΔW from the same parameters: the file's id is what counts
    values = {k.replace("__", "."): v for k, v in adapter.params.items()}
    other = tat.attach(Tiny(), configs()[kind], ["up", "down"])
    assert other.generator_id == V2
    with torch.no_grad():
        for k, v in values.items():
            other.params[k.replace(".", "__")].copy_(v)
    assert not torch.allclose(other.deltas()["up"], expected["up"])


@pytest.mark.parametrize("kind", KINDS)
def test_generator_1_adapter_made_today_equals_the_committed_file(kind: str, tmp_path) -> None:
    adapter = build(kind, generator=V1)
    path = adapter.save(tmp_path / "today.safetensors")
    tensors, meta = read_adapter(path)
    old_tensors, old_meta = read_adapter(DATA / f"{kind}_v1.safetensors")
    meta.pop("library_version"), old_meta.pop("library_version")
    assert meta == old_meta
    assert set(tensors) == set(old_tensors) and all(torch.equal(tensors[k], old_tensors[k]) for k in tensors)
    expected = safetensors_torch.load_file(str(DATA / f"{kind}_v1_delta.safetensors"))
    assert all(torch.equal(d, expected[n]) for n, d in adapter.deltas().items())


@pytest.mark.parametrize("generator", [None, V1, V2])
@pytest.mark.parametrize("kind", KINDS)
def test_attach_generator_is_stored_and_reloaded(kind: str, generator: str | None, tmp_path) -> None:
    options = {} if generator is None else {"generator": generator}
    torch.manual_seed(0)
    model = Tiny()
    adapter = build(kind, model, **options)
    chosen = generator or buffers.GENERATOR_ID
    assert buffers.GENERATOR_ID == V2
    assert adapter.generator_id == chosen and adapter.plan.generator_id == chosen
    assert all(adapter.plan.projection(g).generator == chosen for g in range(2))
    assert adapter.metadata()["generator_id"] == chosen
    assert f"generator={chosen.split(' ')[0]}" in adapter.summary().splitlines()[1]
    path = adapter.save(tmp_path / "a.safetensors")
    assert json.loads(json.dumps(tat.read_metadata(path)))["generator_id"] == chosen
    torch.manual_seed(0)
    fresh = Tiny()  # the same base weights
    loaded = tat.load(fresh, path)
    assert loaded.generator_id == chosen
    for name, delta in adapter.deltas().items():
        assert torch.equal(loaded.deltas()[name], delta)
    assert torch.equal(fresh(_x()), model(_x()))


def test_the_two_generators_give_different_updates_for_the_same_parameters() -> None:
    for kind in KINDS:
        old, new = build(kind, generator=V1), build(kind, generator=V2)
        assert all(torch.equal(old.params[k], new.params[k]) for k in old.params)
        assert not torch.allclose(old.deltas()["up"], new.deltas()["up"])


@pytest.mark.parametrize(("generator", "error", "match"), [
    ("tensoradapt.buffers/3", ValueError, r"generator must be one of \('tensoradapt\.buffers/1"),
    (2, TypeError, "generator must be a generator id string.*got int 2"),
    (["x"], TypeError, "got list"),
])
def test_attach_refuses_an_unknown_generator_and_leaves_the_model_alone(generator, error, match) -> None:
    model = Tiny()
    before = _state(model)
    with pytest.raises(error, match=match):
        tat.attach(model, configs()["fastfood"], ["up", "down"], generator=generator)
    assert not hasattr(model, "tensoradapt") and _same_state(model, before)
    assert all(p.requires_grad for p in model.parameters())
    assert type(model.up) is torch.nn.Linear


@pytest.mark.parametrize("value", ["tensoradapt.buffers/3 (future)", 2, None, ["x"]])
def test_file_with_an_unknown_generator_is_refused_naming_the_file_and_the_known_ids(value, tmp_path) -> None:
    tensors, meta = read_adapter(build("shuffle").save(tmp_path / "a.safetensors"))
    meta["generator_id"] = value
    path = tmp_path / "unknown.safetensors"
    path.write_bytes(safetensors_torch.save(tensors, metadata={"format": "pt", "tensoradapt": json.dumps(meta)}))
    model = Tiny()
    before = _state(model)
    with pytest.raises(tat.AdapterFileError) as info:
        tat.load(model, path)
    message = str(info.value)
    assert "unknown.safetensors" in message and f"buffer generator {value!r}" in message
    assert V1 in message and V2 in message
    assert not hasattr(model, "tensoradapt") and _same_state(model, before)
    del meta["generator_id"]
    path.write_bytes(safetensors_torch.save(tensors, metadata={"format": "pt", "tensoradapt": json.dumps(meta)}))
    with pytest.raises(tat.AdapterFileError, match="buffer generator None"):
        tat.load(model, path)


def test_glora_files_record_generator_1_and_load_with_any_known_id(tmp_path) -> None:
    adapter = tat.attach(Tiny(), GLoRAConfig(rank=2), ["up", "down"])
    assert adapter.metadata()["generator_id"] == V1  # its seeded init is generator 1's PCG64 streams
    tensors, meta = read_adapter(adapter.save(tmp_path / "g.safetensors"))
    meta["generator_id"] = V2
    path = tmp_path / "g2.safetensors"
    path.write_bytes(safetensors_torch.save(tensors, metadata={"format": "pt", "tensoradapt": json.dumps(meta)}))
    loaded = tat.load(Tiny(), path)
    assert all(torch.equal(loaded.state_tensors()[k], v) for k, v in adapter.state_tensors().items())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_files_reproduce_their_delta_on_cuda(kind: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    expected = safetensors_torch.load_file(str(DATA / f"{kind}_v1_delta.safetensors"))
    adapter = tat.load(Tiny().cuda(), DATA / f"{kind}_v1.safetensors")
    assert adapter.generator_id == V1
    for name, delta in adapter.deltas().items():  # the same maps; CUDA GEMMs round differently from the CPU's
        torch.testing.assert_close(delta.cpu(), expected[name], rtol=1e-5, atol=1e-7)
    cpu, gpu = build(kind), build(kind, Tiny().cuda())  # generator 2: maps computed on the device
    for name, delta in cpu.deltas().items():
        torch.testing.assert_close(gpu.deltas()[name].cpu(), delta, rtol=1e-5, atol=1e-7)
