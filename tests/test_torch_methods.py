"""The method registry of the torch bindings (tensoradapt.torch.methods): one record per method, which
``attach``, ``load``, Trainer checkpoints and the exports look up instead of naming methods."""

import dataclasses

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, presets  # noqa: E402
from tensoradapt.torch import methods  # noqa: E402


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


CONFIGS = {"superlora": presets.lora(2), "glora": GLoRAConfig(rank=2)}


def test_every_method_is_registered_once() -> None:
    assert sorted(methods.names()) == ["glora", "superlora"]
    for name, config in CONFIGS.items():
        method = methods.by_name(name)
        assert method.name == name and methods.by_config(config) is method
        assert isinstance(config, method.config_type)
    assert methods.by_config(3) is None
    with pytest.raises(KeyError):
        methods.by_name("lora")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_method_reads_what_its_adapter_writes(name: str, tmp_path) -> None:
    """The record's target keys are the keys the adapter's file carries; attach and load go through it."""
    model = _mlp()
    adapter = tat.attach(model, CONFIGS[name], ["0", "2"])
    method = methods.of_adapter(adapter)
    assert method is methods.by_name(name) and isinstance(adapter, method.adapter_type)
    assert all(isinstance(w, method.layer_type) for w in adapter.wrappers)
    assert all(set(record) == method.target_keys for record in adapter.metadata()["targets"])
    adapter.save(tmp_path / "a.safetensors")
    path, _, metadata = methods.check_file(tmp_path / "a.safetensors")
    assert path == tmp_path / "a.safetensors" and isinstance(metadata["config"], method.config_type)
    loaded = tat.load(_mlp(), tmp_path / "a.safetensors")
    assert methods.of_adapter(loaded) is method


def test_the_registry_refuses_what_it_cannot_hold() -> None:
    superlora = methods.by_name("superlora")
    assert methods.register(superlora) is superlora  # the same record again: nothing changes
    with pytest.raises(ValueError, match="already registered"):
        methods.register(dataclasses.replace(superlora, state_label="another"))
    with pytest.raises(TypeError, match="takes a Method"):
        methods.register("superlora")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not an adapter of a registered method"):
        methods.of_adapter(nn.Linear(2, 2))
    assert sorted(methods.names()) == ["glora", "superlora"]
