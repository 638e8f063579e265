"""One target view: counting a model's targets (core) and attaching an adapter (torch) see the same shapes.

``count_params(config, shapes_from_model(model, targets))`` must equal
``attach(model, config, targets).num_params`` for every preset on Linear, transformers' Conv1D
(GPT-2's ``c_attn``, weight stored ``(in, out)``), Conv2d and Embedding targets.
"""

from __future__ import annotations

import inspect

import pytest

from tensoradapt import SuperLoRAConfig, _targets, count_params, presets
from tensoradapt.analysis import count_table, shapes_from_model

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt.torch import modules as torch_modules  # noqa: E402
from tensoradapt.torch import targets as torch_targets  # noqa: E402

CONFIGS = {
    "dense": presets.dense(),
    "lora": presets.lora(2),
    "lokr": presets.lokr(2),
    "krona": presets.krona(),
    "loha": presets.loha(2),
    "lotr": presets.lotr(2),
    "lonkr": presets.lonkr(2, 2),
    "lorta": presets.lorta(3, 2),
    "lorta-cp": presets.lorta(3, 2, core="cp"),
    "fastfood": presets.with_projection(presets.lorta(3, 2), "fastfood", 0.5),
    "stack": SuperLoRAConfig(rank=2, layout="stack", grouping=1),  # the bug: 448 counted vs 320 attached on c_attn
}


class _Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(12, 8)
        self.value = nn.Linear(12, 8)


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.grouped = nn.Conv2d(4, 6, (3, 2), groups=2)


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 8)
        self.positions = nn.Embedding(10, 8)


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2))


MODELS = {
    "linear": (_Linears, ["query", "value"]),
    "conv1d": (_gpt2, ["c_attn"]),
    "conv2d": (_Convs, ["conv", "grouped"]),
    "embedding": (_Embeddings, ["tokens", "positions"]),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_count_equals_attached_num_params(model_name, config_name) -> None:
    make, targets = MODELS[model_name]
    model, config = make(), CONFIGS[config_name]
    shapes = shapes_from_model(model, targets)
    try:
        counted = count_params(config, [t.shape for t in shapes], [t.name for t in shapes])
    except ValueError as error:  # the configuration does not apply to these shapes (e.g. LoTR over unequal ones)
        with pytest.raises(ValueError):
            tat.attach(model, config, targets)
        pytest.skip(f"{config_name} does not apply to the {model_name} targets: {error}")
    adapter = tat.attach(model, config, targets)
    assert counted == adapter.num_params
    assert [t.shape for t in shapes] == [v.shape for v in adapter.views]
    (row,) = count_table(shapes, {config_name: config})
    assert row.params == adapter.num_params


def test_gpt2_conv1d_shapes_are_out_by_in() -> None:
    model = _gpt2()
    shapes = shapes_from_model(model, ["c_attn"])
    assert [(t.name, t.shape) for t in shapes] == [
        ("transformer.h.0.attn.c_attn.weight", (96, 32)), ("transformer.h.1.attn.c_attn.weight", (96, 32))]
    assert tuple(model.transformer.h[0].attn.c_attn.weight.shape) == (32, 96)  # stored (in, out)
    config = CONFIGS["stack"]
    assert count_params(config, [t.shape for t in shapes]) == tat.attach(model, config, ["c_attn"]).num_params == 320


def test_views_and_selection_come_from_the_core(monkeypatch) -> None:
    """The torch bindings use the core's rule (no copy): patching it changes what attach sees."""
    assert issubclass(torch_modules.WeightView, _targets.TargetView)
    assert torch_targets.target_view is _targets.target_view and torch_targets.select_targets is _targets.select_targets
    assert torch_modules.target_view is _targets.target_view
    # the torch-side view and matching: all of the modules that hold what bindings/torch/_targets.py held
    source = inspect.getsource(torch_targets) + inspect.getsource(torch_modules)
    assert "math.prod" not in source and "fullmatch" not in source and "endswith" not in source
    calls = {"view": 0, "select": 0}
    view, select = _targets.target_view, _targets.select_targets

    def counting_view(*args, **kwargs):
        calls["view"] += 1
        return view(*args, **kwargs)

    def counting_select(*args, **kwargs):
        calls["select"] += 1
        return select(*args, **kwargs)

    monkeypatch.setattr(torch_targets, "target_view", counting_view)
    monkeypatch.setattr(torch_modules, "target_view", counting_view)
    monkeypatch.setattr(torch_targets, "select_targets", counting_select)
    monkeypatch.setattr(_targets, "target_view", counting_view)
    monkeypatch.setattr(_targets, "select_targets", counting_select)
    model = _Convs()
    shapes_from_model(model, ["conv"])
    assert calls == {"view": 1, "select": 1}
    tat.attach(model, presets.lora(1), ["conv"])
    assert calls["view"] >= 2 and calls["select"] == 2


def test_core_view_is_duck_typed() -> None:
    class Conv1D:  # transformers' layer, without importing transformers
        nf = 6

        def __init__(self) -> None:
            self.weight = torch.zeros(4, 6)

    assert _targets.target_view("c", Conv1D()) == _targets.TargetView("conv1d", (6, 4), (4, 6))
    assert _targets.target_view("l", nn.Linear(3, 5)).kind == "linear"
    assert _targets.target_view("c", nn.Conv3d(2, 4, (3, 1, 2))) == _targets.TargetView("weight", (4, 12),
                                                                                         (4, 2, 3, 1, 2))
    assert _targets.target_view("e", nn.Embedding(7, 3)) == _targets.TargetView("weight", (7, 3), (7, 3))
    with pytest.raises(TypeError, match="1-D weight"):
        _targets.target_view("n", nn.LayerNorm(4))
    with pytest.raises(TypeError, match="no `weight` tensor"):
        _targets.target_view("r", nn.ReLU())
    with pytest.raises(TypeError, match="no `weight` tensor"):
        torch_modules.weight_view("x", type("M", (), {"weight": torch.zeros(2, 2).numpy()})())
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _targets.target_matcher("(")
    with pytest.raises(TypeError, match="non-empty list"):
        _targets.target_matcher([])


def test_count_params_takes_shapes_from_model_directly_and_selection_matches_attach() -> None:
    """The literal equality: ``count_params(config, shapes_from_model(model, targets))`` (Target
    records, names included, so ``grouping="layer"`` groups like attach), and a selected module
    without an adaptable weight is refused by both."""
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    for config in (presets.lorta(3, 2, groups="layer"), presets.lonkr(2, 2, groups="layer"), presets.lora(2)):
        shapes = shapes_from_model(model, ["c_attn", "c_proj"])
        adapter = tat.attach(model, config, ["c_attn", "c_proj"])
        try:
            assert count_params(config, shapes) == adapter.num_params
        finally:
            adapter.detach()
    selection = r"transformer\.h\.0\.(attn|attn\.c_attn)"  # selects GPT2Attention itself too
    for refuse in (lambda: shapes_from_model(model, selection), lambda: tat.attach(model, presets.lora(1), selection)):
        with pytest.raises(TypeError, match=r"'transformer\.h\.0\.attn'"):
            refuse()


def test_core_finds_the_model_reader_through_its_entry_point(monkeypatch) -> None:
    """``tensoradapt.analysis.shapes_from_model`` is the binding's reader, found by name (the core imports
    neither torch nor the bindings): no binding installed is an ImportError (without the entry point, the
    torch reader by module name when torch imports), and with several the model's framework chooses."""
    import importlib.metadata
    import importlib.util

    from tensoradapt.analysis import shapes as core_shapes

    model = nn.Sequential(nn.Linear(3, 4))
    assert core_shapes.shapes_from_model(model) == torch_targets.shapes_from_model(model)
    found = importlib.metadata.entry_points(group=core_shapes.MODEL_SHAPES_GROUP)
    assert [ep.value for ep in found] == ["tensoradapt.torch.targets:shapes_from_model"]

    class Reader:
        def __init__(self, name: str, value: object) -> None:
            self.name, self.value = name, value

        def load(self) -> object:
            return self.value

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    # no entry point (stale install metadata): the torch reader by its module name while torch imports
    assert core_shapes.shapes_from_model(model) == torch_targets.shapes_from_model(model)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torch" else find_spec(name, *args))
    with pytest.raises(ImportError, match="none is installed"):
        core_shapes.shapes_from_model(model)
    readers = [Reader("jax", lambda *args, **kwargs: "jax's"), Reader("torch", lambda *args, **kwargs: "torch's")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: readers)
    assert core_shapes.shapes_from_model(model) == "torch's"
    with pytest.raises(TypeError, match="one of \\['jax', 'torch'\\]"):
        core_shapes.shapes_from_model(object())
