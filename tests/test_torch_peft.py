"""PEFT folders both ways (tensoradapt.torch.export_peft / import_peft), compared with real peft.

Every round trip loads the folder with ``peft.PeftModel.from_pretrained`` and compares outputs in
float32; the rank-r exports are checked against an independent float64 SVD of ``ΔW``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, LayerChoice, SuperLoRAConfig, presets  # noqa: E402
from tensoradapt.torch import AdapterFileError  # noqa: E402
from tensoradapt.torch.peft.lokr import peft_factorization  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------- models
class Net(nn.Module):
    """Linear layers of unequal shapes (one without bias), for LoRA, LoKr, LoHa and GLoRA."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 12, bias=False)
        self.c = nn.Linear(12, 6)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Square(nn.Module):
    """Equal-shape Linear layers (LoTR needs them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.p = nn.Linear(16, 16)
        self.q = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.q(torch.tanh(self.p(x)))))


class ConvEmb(nn.Module):
    """An embedding (with a padding row) and convolutions, for LoRA's other layer kinds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(6, 4, 1)
        self.out = nn.Linear(4, 2)

    def forward(self, ids):
        h = self.emb(ids)  # (B, L, 8)
        img = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 3)  # (B, 8, L, 3)
        h = torch.tanh(self.conv(img)).mean(-1)  # (B, 6, L)
        return self.out(torch.tanh(self.conv1(h)).mean(-1))


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))
IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(9))
TOKENS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(9))
TOKENS[0, :2] = 0  # the padding row is used


def run(model):
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    with torch.no_grad():
        if isinstance(base, transformers.GPT2LMHeadModel):
            return model(IDS).logits
        return model(TOKENS if isinstance(base, ConvEmb) else X)


def perturb(adapter, scale=0.3, seed=0):
    """Every trainable tensor moved off its init (zero blocks included), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def peft_load(make, folder):
    return peft.PeftModel.from_pretrained(make(), str(folder)).eval()


def peft_own_layout(make, folder):
    """Key -> shape of the file PEFT itself saves for the config we wrote (a fresh get_peft_model)."""
    config = peft.PeftConfig.from_pretrained(str(folder))
    state = peft.get_peft_model_state_dict(peft.get_peft_model(make(), config))
    return {k: tuple(v.shape) for k, v in state.items()}


def our_layout(folder):
    tensors = safetensors_torch.load_file(str(folder / "adapter_model.safetensors"))
    return {k: tuple(v.shape) for k, v in tensors.items()}


def round_trip(make, config, targets, tmp_path, *, rank=None, tolerance=1e-5):
    """attach + perturb → export → PeftModel (outputs) → import_peft (outputs); returns the pieces."""
    model = make().eval()
    adapter = tat.attach(model, config, targets)
    perturb(adapter)
    want = run(model)
    folder = tmp_path / "peft"
    result = tat.export_peft(adapter, folder, rank=rank)
    loaded = peft_load(make, folder)
    got = run(loaded)
    assert rel(got, want) <= tolerance, (result, rel(got, want))
    assert our_layout(folder) == peft_own_layout(make, folder)  # PEFT's own key names and shapes
    return model, adapter, want, folder, result, got


# ---------------------------------------------------------------------------------- exact exports
@pytest.mark.parametrize("config", [presets.lora(3, alpha=6.0), presets.lora(2)], ids=["alpha", "scale1"])
@pytest.mark.parametrize("make,targets", [(Net, ["a", "b", "c"]), (gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["linear", "gpt2-conv1d"])
def test_lora_both_ways(make, targets, config, tmp_path):
    _model, _adapter, _want, folder, result, got = round_trip(make, config, targets, tmp_path)
    assert result.peft_type == "LORA" and set(result.errors.values()) == {0.0}
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is (make is gpt2) and written["r"] == config.rank
    fresh = make().eval()
    imported = tat.import_peft(fresh, folder)
    assert imported.config.rank == config.rank
    assert rel(run(fresh), got) <= 1e-5
    assert set(imported.factored_targets) == set(range(len(imported.target_names)))  # LoRA's factored path


@pytest.mark.parametrize("config", [
    presets.lokr(2), presets.lokr(2, alpha=4.0), presets.lokr(2, factor=4, alpha=3.0),
    presets.lokr(1, decompose_both=True, alpha=2.0), presets.lokr(8, alpha=5.0), presets.krona(scale=0.5),
    presets.loha(2, alpha=3.0), presets.loha(3),
], ids=["lokr", "lokr-alpha", "lokr-factor4", "lokr-both", "lokr-full-blocks", "krona", "loha-alpha", "loha"])
def test_lokr_loha_both_ways(config, tmp_path):
    _model, _adapter, _want, folder, result, got = round_trip(Net, config, ["a", "b", "c"], tmp_path)
    assert result.peft_type == ("LOHA" if config.unit == "hadamard" else "LOKR")
    fresh = Net().eval()
    tat.import_peft(fresh, folder)
    assert rel(run(fresh), got) <= 1e-5


def test_lokr_keeps_alpha_over_r_with_full_blocks(tmp_path):
    """LyCORIS (and tensoradapt) scale a full second block by 1; PEFT keeps alpha/r: the export
    writes alpha = r so that PEFT's alpha/r is our 1, and the import turns PEFT's alpha/r into a scale."""
    config = presets.lokr(8, alpha=5.0)  # rank 8 >= max(c, e)/2 for every target: full blocks, scale 1
    model, adapter, want, folder, _result, _got = round_trip(Net, config, ["a", "b", "c"], tmp_path)
    assert all(g.scale == 1.0 for g in adapter.plan.groups)
    written = json.loads((folder / "adapter_config.json").read_text())
    assert written["alpha"] == written["r"] and written["alpha_pattern"] == {}
    # a PEFT LoKr with full blocks and alpha/r != 1: the imported adapter scales by alpha/r too
    base = Net()
    model = peft.get_peft_model(base, peft.LoKrConfig(r=8, alpha=2.0, target_modules=["a", "b"], init_weights=False))
    model.eval()
    want = run(model)
    model.save_pretrained(str(tmp_path / "full"))
    fresh = Net().eval()
    imported = tat.import_peft(fresh, tmp_path / "full")
    assert {g.scale for g in imported.plan.groups} == {2.0 / 8}
    assert rel(run(fresh), want) <= 1e-5


def test_peft_factorization_is_unsorted_when_the_factor_divides():
    from peft.tuners.lokr.layer import factorization as theirs

    from tensoradapt.superlora.factorize import factorization as ours

    for dim in range(1, 80):
        for factor in (-1, 1, 2, 3, 4, 6, 8, 16):
            assert peft_factorization(dim, factor) == theirs(dim, factor)
    assert peft_factorization(12, 4) == (4, 3) and ours(12, 4) == (3, 4)


def test_import_refuses_peft_unsorted_lokr_blocks(tmp_path):
    """decompose_factor=4 on 12 outputs gives PEFT's w1 (4, ·) larger than w2 (3, ·): tensoradapt
    keeps the smaller factor first, so it refuses rather than loading something else."""
    base = Net()
    model = peft.get_peft_model(base, peft.LoKrConfig(r=1, decompose_factor=4, target_modules=["b"],
                                                      init_weights=False))
    model.save_pretrained(str(tmp_path / "f4"))
    fresh = Net()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(AdapterFileError, match="smaller factor first"):
        tat.import_peft(fresh, tmp_path / "f4")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items()) and set(before) == set(
        fresh.state_dict())


def test_peft_lokr_and_loha_import_match_peft(tmp_path):
    """Folders written by peft itself (random init) import to the same outputs."""
    for i, config in enumerate([peft.LoKrConfig(r=2, alpha=3.0, target_modules=["a", "b", "c"], init_weights=False),
                                peft.LoKrConfig(r=1, decompose_both=True, target_modules=["a", "c"],
                                                init_weights=False),
                                peft.LoHaConfig(r=2, alpha=5.0, target_modules=["a", "b", "c"], init_weights=False),
                                peft.LoraConfig(r=2, lora_alpha=3.0, use_rslora=True, target_modules=["a", "c"],
                                                init_lora_weights=False)]):
        model = peft.get_peft_model(Net(), config).eval()
        want = run(model)
        model.save_pretrained(str(tmp_path / str(i)))
        fresh = Net().eval()
        tat.import_peft(fresh, tmp_path / str(i))
        assert rel(run(fresh), want) <= 1e-5, config.peft_type


def test_refuses_what_peft_lokr_loha_cannot_express(tmp_path):
    model = gpt2()
    adapter = tat.attach(model, presets.lokr(2), ["c_attn"])
    with pytest.raises(ValueError, match=r"transformers Conv1D.*rank="):
        tat.export_peft(adapter, tmp_path / "x")
    adapter.detach()
    net = ConvEmb()
    adapter = tat.attach(net, presets.lokr(2), ["conv"])  # PEFT factorises channels apart from the kernel
    with pytest.raises(ValueError, match="no PEFT LoKr"):
        tat.export_peft(adapter, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_conv_and_embedding_lora_and_conv_loha(tmp_path):
    _model, adapter, _want, folder, _result, got = round_trip(ConvEmb, presets.lora(2, alpha=3.0),
                                                           ["emb", "conv", "conv1"], tmp_path)
    assert float(adapter.deltas()["emb"][0].abs().max()) > 0  # the raw ΔW has a padding row ...
    fresh = ConvEmb().eval()
    tat.import_peft(fresh, folder)  # ... which the export zeroed, as tensoradapt's forward does
    assert rel(run(fresh), got) <= 1e-5
    _, _, _, folder, _result, got = round_trip(ConvEmb, presets.loha(2, alpha=2.0), ["conv", "conv1"],
                                              tmp_path / "loha")
    fresh = ConvEmb().eval()
    tat.import_peft(fresh, folder)
    assert rel(run(fresh), got) <= 1e-5
    # LoKr on a Conv1d whose (o, i·k) factorisation is PEFT's channel factorisation (kernel 1)
    _, _, _, folder, result, got = round_trip(ConvEmb, presets.lokr(1, alpha=2.0), ["conv1"], tmp_path / "lokr")
    assert result.peft_type == "LOKR"
    fresh = ConvEmb().eval()
    tat.import_peft(fresh, folder)
    assert rel(run(fresh), got) <= 1e-5


@pytest.mark.skipif(not isinstance(getattr(tat.BaseAdapter, "model", None), property),
                    reason="needs the public BaseAdapter.model property (the export sees the other modules through it)")
def test_target_modules_regex_when_a_name_is_a_suffix_of_another_module(tmp_path):
    outer = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))  # "0" and "1.0"
    adapter = tat.attach(outer, presets.lora(2), r"0")  # a regular expression: "0" only
    assert adapter.target_names == ("0",)
    tat.export_peft(adapter, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == "^(?:0)$"
    loaded = peft.PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))),
                                            str(tmp_path))
    assert [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")] == ["base_model.model.0"]


# ---------------------------------------------------------------------------------- GLoRA
GLORA_CASES = {
    "uniform-lora": [LayerChoice(A="lora", B="lora", C="lora", D="scalar", E="scalar", rank=4),
                     LayerChoice(A="lora", B="lora", rank=4),
                     LayerChoice(A="lora", B="lora", C="lora", D="scalar", E="scalar", rank=4)],
    "mixed": [LayerChoice(A="vector", B="lora", C="vector", D="scalar", E="vector", rank=2),
              LayerChoice(A="scalar", B="none"),
              LayerChoice(A="none", B="vector", C="lora", D="none", E="scalar", rank=3)],
    "vector": [LayerChoice(A="vector", B="vector", C="vector", D="vector", E="vector"),
               LayerChoice(A="vector", B="vector"),
               LayerChoice(A="vector", B="vector", C="vector", D="vector", E="vector")],
}


@pytest.mark.parametrize("case", list(GLORA_CASES))
def test_glora_both_ways(case, tmp_path):
    model = Net().eval()
    adapter = tat.attach(model, GLoRAConfig(rank=4), ["a", "b", "c"])
    perturb(adapter)
    adapter.set_configs(GLORA_CASES[case])
    want = run(model)
    result = tat.export_peft(adapter, tmp_path / "g")
    assert result.peft_type == "GLORA"
    loaded = peft_load(Net, tmp_path / "g")
    assert rel(run(loaded), want) <= 1e-5
    assert our_layout(tmp_path / "g") == peft_own_layout(Net, tmp_path / "g")
    fresh = Net().eval()
    tat.import_peft(fresh, tmp_path / "g")
    assert rel(run(fresh), want) <= 1e-5
    # the file route: the same PEFT folder from our saved adapter alone
    adapter.save(tmp_path / "g.safetensors")
    tat.export_peft(tmp_path / "g.safetensors", tmp_path / "g2", device="cpu")
    assert rel(run(peft_load(Net, tmp_path / "g2")), want) <= 1e-5


def test_glora_refusals(tmp_path):
    model = Net()
    adapter = tat.attach(model, GLoRAConfig(rank=2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="bias-free"):  # the supernet's largest choice gives layer b a bias
        tat.export_peft(adapter, tmp_path / "x")
    adapter.set_configs([LayerChoice(A="lora", B="lora")] * 3)
    with pytest.raises(ValueError, match="rank=None"):
        tat.export_peft(adapter, tmp_path / "x", rank=2)
    adapter.detach()
    adapter = tat.attach(gpt2(), GLoRAConfig(rank=2), ["c_attn"])
    adapter.set_configs(LayerChoice(A="lora", B="lora"))
    with pytest.raises(ValueError, match=r"plain nn\.Linear"):
        tat.export_peft(adapter, tmp_path / "x")


# ---------------------------------------------------------------------------------- rank-r exports
def _svd_reference(delta, r):
    """Independent rank-r truncation of ΔW in float64: (ΔW_r, relative error, tail norm / norm)."""
    work = delta.double()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    approx = (U[:, :r] * S[:r]) @ Vh[:r]
    norm = float(torch.linalg.matrix_norm(work))
    return approx, float(torch.linalg.matrix_norm(work - approx)) / norm, float(S[r:].norm()) / norm


RANK_CASES = {
    "lorta": (gpt2, presets.lorta(3, 4), ["c_attn", "c_proj"]),
    "lonkr": (gpt2, presets.lonkr(2, 4), ["c_attn", "c_fc"]),
    "lotr": (Square, presets.lotr(3), ["p", "q"]),
    "fastfood": (gpt2, presets.with_projection(SuperLoRAConfig(order=2, rank=4, grouping=1), "fastfood", 0.1),
                 ["c_attn"]),
    "grouped": (Net, SuperLoRAConfig(order=2, rank=3, core="identity", grouping=2), ["a", "b", "c"]),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_rank_r_export_is_the_truncated_svd(case, tmp_path):
    make, config, targets = RANK_CASES[case]
    model = make().eval()
    adapter = tat.attach(model, config, targets)
    perturb(adapter, scale=0.05)
    deltas = adapter.deltas()
    r = 2
    result = tat.export_peft(adapter, tmp_path / "r", rank=r)
    assert result.peft_type == "LORA" and set(result.ranks.values()) == {r}
    expected = make().eval()
    with torch.no_grad():  # W + ΔW_r by hand, in float64 then rounded once
        modules = dict(expected.named_modules())
        for name, delta in deltas.items():
            approx, error, tail = _svd_reference(delta, r)
            assert result.errors[name] == pytest.approx(error, rel=1e-5, abs=1e-7)
            assert error == pytest.approx(tail, rel=1e-6, abs=1e-9)  # Eckart–Young
            weight = modules[name].weight
            update = approx.t() if type(modules[name]).__name__ == "Conv1D" else approx
            weight.copy_((weight.double() + update).to(weight.dtype))
    got = run(peft_load(make, tmp_path / "r"))
    assert rel(got, run(expected)) <= 1e-5
    exact = tat.export_peft(adapter, tmp_path / "e", rank="exact")
    assert max(exact.errors.values()) <= 1e-6
    assert rel(run(peft_load(make, tmp_path / "e")), run(model)) <= 1e-5
    for name, delta in deltas.items():  # the smallest such rank
        q = exact.ranks[name]
        assert q == 1 or _svd_reference(delta, q - 1)[1] > 1e-6
    assert "rel. error" in str(exact) and all(name in str(exact) for name in deltas)


def test_rank_r_on_an_exact_config_and_file_route(tmp_path):
    model = Net().eval()
    adapter = tat.attach(model, presets.lora(4, alpha=8.0), ["a", "b", "c"])
    perturb(adapter)
    result = tat.export_peft(adapter, tmp_path / "svd", rank="exact")
    assert result.peft_type == "LORA" and all(q <= 4 for q in result.ranks.values())
    assert rel(run(peft_load(Net, tmp_path / "svd")), run(model)) <= 1e-5
    adapter.save_pretrained(tmp_path / "ours")
    from_file = tat.export_peft(tmp_path / "ours", tmp_path / "svd2", rank="exact", device="cpu",
                                base_model_name_or_path="tiny/net")
    assert from_file.ranks == result.ranks
    assert json.loads((tmp_path / "svd2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny/net"
    ours, theirs = our_layout(tmp_path / "svd"), our_layout(tmp_path / "svd2")
    assert ours == theirs
    tat.export_peft(tmp_path / "ours", tmp_path / "exact", device="cpu")  # the exact LoRA from the file
    assert rel(run(peft_load(Net, tmp_path / "exact")), run(model)) <= 1e-5


def test_rank_validation_and_refusals(tmp_path):
    model = gpt2()
    adapter = tat.attach(model, presets.lorta(3, 4), ["c_attn"])
    with pytest.raises(ValueError, match="rank=r"):
        tat.export_peft(adapter, tmp_path / "x")
    for bad, error in [(0, ValueError), (-3, ValueError), (True, TypeError), (1.5, TypeError), ("full", TypeError),
                       (33, ValueError)]:
        with pytest.raises(error):
            tat.export_peft(adapter, tmp_path / "x", rank=bad)
    with pytest.raises(TypeError):
        tat.export_peft(object(), tmp_path / "x", rank=2)
    with pytest.raises(FileNotFoundError):
        tat.export_peft(tmp_path / "missing.safetensors", tmp_path / "x", rank=2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError):
        tat.export_peft(tmp_path / "junk.safetensors", tmp_path / "x", rank=2)
    adapter.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match="overwrite"):
        tat.export_peft(adapter, tmp_path / "ours", rank=2)
    net = Net()
    saved = tat.attach(net, presets.lora(2), ["a"], modules_to_save=["c"])
    with pytest.raises(ValueError, match="modules_to_save"):
        tat.export_peft(saved, tmp_path / "y")


# ---------------------------------------------------------------------------------- import: train, save, load
def test_import_train_save_load(tmp_path):
    base = Net()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "c"],
                                                      init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "peft"))
    fresh = Net()
    adapter = tat.import_peft(fresh, tmp_path / "peft", name="imported")
    assert fresh.tensoradapt.names == ("imported",)
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.1)
    loss = fresh(X).pow(2).mean()
    loss.backward()
    opt.step()
    after = fresh(X).detach()
    assert not torch.allclose(after, model(X).detach())
    adapter.save(tmp_path / "trained.safetensors")
    again = Net()
    tat.load(again, tmp_path / "trained.safetensors")
    assert torch.equal(again(X), after)


# ---------------------------------------------------------------------------------- import refusals
def _peft_folder(tmp_path, config, make=Net):
    model = peft.get_peft_model(make(), config)
    folder = tmp_path / config.peft_type.value
    model.save_pretrained(str(folder))
    return folder


def _edit_config(folder, **changes):
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias='all'"),
    ({"rank_pattern": {"a": 4}}, "not rank 4"),  # the pattern applies, and the tensors are rank 2
    ({"rank_pattern": {"a": 0}}, "rank_pattern"),
    ({"alpha_pattern": {"c": "x"}}, "alpha_pattern"),
    ({"r": 10**18}, "largest tensoradapt rank"),
    ({"some_future_option": 3}, "some_future_option"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"r": "2"}, "positive integer"),
    ({"lora_alpha": "x"}, "finite number"),
])
def test_import_refuses_config_options(change, match, tmp_path):
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=2, target_modules=["a", "c"]))
    _edit_config(folder, **change)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterFileError, match=match):
        tat.import_peft(fresh, folder)
    assert not hasattr(fresh, "tensoradapt")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_import_refuses_bad_files(tmp_path):
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=2, target_modules=["a", "c"], use_dora=True))
    with pytest.raises(AdapterFileError):
        tat.import_peft(Net(), folder)  # use_dora in the config (and magnitude tensors in the file)
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=2, target_modules=["a", "c"]))
    config = folder / "adapter_config.json"
    text = config.read_text()
    for bad, match in [("{" * 40 + "}" * 40, "deeper"), ('{"peft_type": "LORA", "r": NaN}', "not valid JSON"),
                       ('{"peft_type": "LORA", "peft_type": "LORA"}', "not valid JSON"), ("[1, 2]", "not an object"),
                       ('{"library": "tensoradapt"}', "not a PEFT adapter config")]:
        config.write_text(bad)
        with pytest.raises(AdapterFileError, match=match):
            tat.import_peft(Net(), folder)
    config.write_text(text)
    with pytest.raises(AdapterFileError, match="does not have"):
        tat.import_peft(Square(), folder)
    weights = folder / "adapter_model.safetensors"
    weights.rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickle"):
        tat.import_peft(Net(), folder)
    with pytest.raises(FileNotFoundError):
        tat.import_peft(Net(), tmp_path / "nowhere")
    state = peft.get_peft_model_state_dict(peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["a"])))
    state["base_model.model.a.lora_magnitude_vector"] = torch.ones(24)
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    with pytest.raises(AdapterFileError, match="magnitude_vector"):
        tat.import_peft(Net(), folder)


def test_import_refuses_peft_conv_lora_with_dilation(tmp_path):
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, dilation=2)

        def forward(self, x):
            return self.conv(x)

    folder = _peft_folder(tmp_path, peft.LoraConfig(r=2, target_modules=["conv"]), make=Dilated)
    with pytest.raises(AdapterFileError, match="dilation"):
        tat.import_peft(Dilated(), folder)


def test_glora_import_of_peft_folder(tmp_path):
    for i, (ab, c, de) in enumerate([("lora", "lora", "constant"), ("vector", "vector", "vector"),
                                     ("constant", "none", "none"), ("none", "lora", "vector")]):
        model = peft.get_peft_model(Net(), peft.GloraConfig(r=3, target_modules=["a", "b", "c"], config_A_B=ab,
                                                            config_C=c, config_D_E=de, init_weights=False)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "glora_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        want = run(model)
        model.save_pretrained(str(tmp_path / str(i)))
        fresh = Net().eval()
        adapter = tat.import_peft(fresh, tmp_path / str(i))
        assert rel(run(fresh), want) <= 1e-5, (ab, c, de)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tat.export_peft(adapter, tmp_path / f"back{i}")  # fixed configs: no supernet warning
        assert rel(run(peft_load(Net, tmp_path / f"back{i}")), want) <= 1e-5
    assert math.isfinite(float(want.sum()))


def test_untrained_adapter_exports_zero_updates(tmp_path):
    model = Net().eval()
    adapter = tat.attach(model, presets.lorta(2, 3), ["a", "c"])  # ΔW = 0 at init
    result = tat.export_peft(adapter, tmp_path, rank="exact")
    assert set(result.ranks.values()) == {1} and set(result.errors.values()) == {0.0}
    assert torch.equal(run(peft_load(Net, tmp_path)), run(Net().eval()))


# ---------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("kind", ["lora", "lora-rslora", "loha"])
def test_import_applies_rank_and_alpha_patterns(kind, tmp_path):
    """Per-module ranks and alphas (rank_pattern / alpha_pattern, as PEFT resolves them) import exactly:
    one rank R = max r_i (zero-padded factors) and the scales folded into the first factor."""
    common = dict(r=4, target_modules=["a", "b", "c"], rank_pattern={"b": 2}, alpha_pattern={"c": 3.0},
                  init_weights=False) if kind == "loha" else dict(
        r=4, target_modules=["a", "b", "c"], rank_pattern={"b": 2}, alpha_pattern={"c": 3.0},
        init_lora_weights=False, use_rslora=kind == "lora-rslora")
    config = peft.LoHaConfig(**common) if kind == "loha" else peft.LoraConfig(**common)
    torch.manual_seed(1)
    model = peft.get_peft_model(Net(), config).eval()
    folder = tmp_path / "p"
    model.save_pretrained(str(folder))
    fresh = Net().eval()
    adapter = tat.import_peft(fresh, folder)
    assert rel(run(fresh), run(model)) <= 1e-5
    assert not torch.allclose(run(fresh), run(Net().eval()))
    fresh(X).square().sum().backward()  # module "b" (rank 2 of R = 4): its padding gets no gradient
    for pname, p in adapter.params.items():
        if pname.startswith("g1__"):
            assert not p[:, 2:].any() and not p.grad[:, 2:].any(), pname
    # a rank pattern covering every module (or none) is one rank: no padding
    uniform = peft.LoraConfig(r=8, target_modules=["a", "c"], rank_pattern={"a": 4, "c": 4}, init_lora_weights=False)
    model = peft.get_peft_model(Net(), uniform).eval()
    model.save_pretrained(str(tmp_path / "u"))
    fresh = Net().eval()
    adapter = tat.import_peft(fresh, tmp_path / "u")
    assert adapter.config.ranks[0] == 4
    assert rel(run(fresh), run(model)) <= 1e-5


def test_exact_export_imports_back(tmp_path):
    """rank="exact" writes rank_pattern / alpha_pattern (unequal ranks); import_peft reads them back."""
    model = Net().eval()
    adapter = tat.attach(model, presets.lorta(3, 2), ["a", "b", "c"])
    perturb(adapter)
    result = tat.export_peft(adapter, tmp_path / "exact", rank="exact")
    assert len(set(result.ranks.values())) > 1  # the case that needs rank_pattern
    written = json.loads((tmp_path / "exact" / "adapter_config.json").read_text())
    assert written["rank_pattern"]
    fresh = Net().eval()
    tat.import_peft(fresh, tmp_path / "exact")
    assert rel(run(fresh), run(model)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_export_of_half_precision_adapter(dtype, tmp_path):
    """ΔW of a half-precision adapter is built in float64 from its parameters: its true rank, error <= 1e-6."""
    model = nn.Sequential(nn.Linear(48, 40))
    adapter = tat.attach(model, presets.lora(3), ["0"], dtype=dtype)
    perturb(adapter, scale=0.1)
    params = {k.replace("__", "."): v.double() for k, v in adapter.params.items()}
    result = tat.export_peft(adapter, tmp_path, rank="exact")
    assert result.ranks["0"] == 3 and result.errors["0"] <= 1e-6, result
    exact = adapter.plan.delta_for(params, [0])[0]
    tensors = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    B, A = tensors["base_model.model.0.lora_B.weight"], tensors["base_model.model.0.lora_A.weight"]
    assert B.dtype == torch.float32
    assert float((B.double() @ A.double() - exact).norm() / exact.norm()) <= 1e-6


def test_target_modules_is_an_exact_regex_from_a_file(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 8))

    model = make()
    adapter = tat.attach(model, presets.lora(2), lambda n, m: n in ("0", "2"))
    perturb(adapter)
    adapter.save(tmp_path / "a.safetensors")
    for source, out in ((adapter, tmp_path / "live"), (tmp_path / "a.safetensors", tmp_path / "file")):
        tat.export_peft(source, out)
        assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == "^(?:0|2)$"
        loaded = peft.PeftModel.from_pretrained(make(), str(out))
        assert [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")] == ["base_model.model.0",
                                                                                  "base_model.model.2"]


def test_overwrite_guard_reads_the_header_not_the_format(tmp_path):
    """A tensoradapt file of a format this version cannot read is still never overwritten."""
    model = Net()
    adapter = tat.attach(model, presets.lora(2), ["a"])
    folder = tmp_path / "ours"
    adapter.save_pretrained(folder)
    (folder / "adapter_config.json").unlink()
    weights = folder / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        meta = handle.metadata()
    tensors = safetensors_torch.load_file(str(weights))
    record = json.loads(meta["tensoradapt"])
    record["format_version"] = 99
    safetensors_torch.save_file(tensors, str(weights), metadata={"format": "pt", "tensoradapt": json.dumps(record)})
    before = weights.read_bytes()
    with pytest.raises(ValueError, match="holds a tensoradapt adapter"):
        tat.export_peft(adapter, folder)
    assert weights.read_bytes() == before and not (folder / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="is a file, not a folder"):  # not a bare NotADirectoryError
        tat.export_peft(adapter, weights / "sub")


def test_device_is_validated_up_front(tmp_path):
    model = Net()
    adapter = tat.attach(model, presets.lora(2), ["a"])
    adapter.save(tmp_path / "a.safetensors")
    bad = ["meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ValueError, match=f"device='{device}'"):
            tat.export_peft(tmp_path / "a.safetensors", tmp_path / "out", device=device)
    assert not (tmp_path / "out").exists()


def test_named_subfolders_message(tmp_path):
    model = Net()
    tat.attach(model, presets.lora(2), ["a"], name="b").save_pretrained(tmp_path / "saved" / "b")  # a named adapter
    with pytest.raises(FileNotFoundError, match="pass a subfolder's path") as info:
        tat.export_peft(tmp_path / "saved", tmp_path / "out")
    assert "name=" not in str(info.value)
    tat.export_peft(tmp_path / "saved" / "b", tmp_path / "out")  # the path it names works


def test_merged_and_detached_exports_warn(tmp_path):
    """The folder is for the unmerged base: exporting a merged adapter (or one detached by
    merge_and_detach) warns; an attached, unmerged one does not."""
    model = Net().eval()
    adapter = tat.attach(model, presets.lora(2), ["a", "c"])
    perturb(adapter)
    want = run(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tat.export_peft(adapter, tmp_path / "plain")
    adapter.merge()
    with pytest.warns(UserWarning, match="merged adapter.*twice"):
        tat.export_peft(adapter, tmp_path / "merged")
    adapter.merge_and_detach()
    with pytest.warns(UserWarning, match="merge_and_detach"):
        tat.export_peft(adapter, tmp_path / "detached")
    for folder in ("merged", "detached"):  # still the adapter's ΔW, for the base weights
        assert rel(run(peft_load(Net, tmp_path / folder)), want) <= 1e-5
    other = tat.attach(Net().eval(), presets.lora(2), ["a", "c"])
    other.detach()  # a plain detach leaves the base weights as they were: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tat.export_peft(other, tmp_path / "plain-detached")


# ---------------------------------------------------------------------------------- SVD export: work, threads, progress
class Wide(nn.Module):
    """Ten 24x16 linears: more targets than an export draws its progress bar for."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.layers = nn.ModuleList(nn.Linear(16 if i == 0 else 24, 24) for i in range(10))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_exact_rank_search_takes_logarithmically_many_evaluations(monkeypatch):
    """When rounding the factors keeps the written error above the tolerance past the truncation's
    rank, the smallest rank that passes is found with O(log r) error evaluations (it took one per
    rank), and it is the rank a scan from the truncation's rank finds."""
    from types import SimpleNamespace

    from tensoradapt.torch.peft import svd

    torch.manual_seed(0)
    o, n = 96, 64
    U = torch.linalg.qr(torch.randn(o, n, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    S = 0.8 ** torch.arange(n, dtype=torch.float64)
    delta = U @ torch.diag(S) @ V.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    total = float(delta.norm())

    def written_error(q: int) -> float:  # float16 factors: rounding dominates from rank ~37 on
        root = s[:q].sqrt()
        B, A = (u[:, :q] * root).half(), (root[:, None] * vh[:q]).half()
        return float((delta - B.double() @ A.double()).norm()) / total

    errors = [written_error(q) for q in range(1, n + 1)]
    tolerance = errors[47] * (1 + 1e-9)  # rank 48 passes
    tails = [float(s[q:].norm()) / total for q in range(1, n + 1)]
    start = next(q for q in range(1, n + 1) if tails[q - 1] <= tolerance)
    expected = next(q for q in range(start, n + 1) if errors[q - 1] <= tolerance)
    assert expected - start >= 8, (start, expected)  # the case the search is for
    monkeypatch.setattr(svd, "EXACT_TOLERANCE", tolerance)
    evaluations = []
    real_norm = torch.linalg.matrix_norm
    monkeypatch.setattr(torch.linalg, "matrix_norm", lambda *a, **k: evaluations.append(1) or real_norm(*a, **k))
    *_, q, error = svd.truncated(SimpleNamespace(layer="linear", padding_idx=None), delta, "exact",
                                  torch.float16)
    assert q == expected and error <= tolerance and error == pytest.approx(errors[q - 1], rel=1e-6)
    gap = expected - start  # a scan from the truncation's rank evaluates gap + 1 ranks
    assert len(evaluations) - 1 <= 1 + 2 * math.ceil(math.log2(gap + 1)) < gap + 1, len(evaluations)


def test_svd_export_runs_small_svds_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    model = Net().eval()
    adapter = tat.attach(model, presets.lorta(3, 2), ["a", "b", "c"])
    perturb(adapter)
    seen = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: seen.append(torch.get_num_threads()) or real_svd(*a, **k))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = tat.export_peft(adapter, tmp_path / "e", rank="exact")
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr("tensoradapt.torch.peft.svd.ONE_THREAD_SVD_SIDE", 8)  # a target above it: as set
        again = tat.export_peft(adapter, tmp_path / "e2", rank="exact")
        assert seen == [2, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert again.ranks == result.ranks
    assert max(abs(again.errors[n] - result.errors[n]) for n in result.errors) <= 1e-7


def test_svd_export_progress_bar_on_many_targets(tmp_path, monkeypatch):
    """A bar (the demo's progress_bar) over the targets when there are many; none for a few or
    with progress=False; and progress_bar itself draws nothing when stderr is not a terminal."""
    import io

    from tensoradapt.torch import progress

    bars = []

    class Bar:
        def __init__(self, total, label, enabled, *, unit="step", leave=False):
            self.total, self.label, self.unit, self.updates, self.closed = total, label, unit, 0, False
            bars.append(self)

        def update(self, n):
            self.updates += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(progress, "progress_bar", Bar)
    many = tat.attach(Wide().eval(), presets.lorta(3, 2), [f"layers.{i}" for i in range(10)])
    perturb(many)
    tat.export_peft(many, tmp_path / "many", rank=2)
    assert [(b.total, b.label, b.unit, b.updates, b.closed) for b in bars] == [(10, "export-peft", "target", 10, True)]
    tat.export_peft(many, tmp_path / "quiet", rank=2, progress=False)
    few = tat.attach(Net().eval(), presets.lorta(3, 2), ["a", "b", "c"])
    perturb(few)
    tat.export_peft(few, tmp_path / "few", rank="exact")
    assert len(bars) == 1
    with pytest.raises(TypeError, match="progress must be True or False, got str 'yes'"):
        tat.export_peft(few, tmp_path / "bad", rank=2, progress="yes")
    monkeypatch.undo()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.progress_bar(10, "export-peft", True) is None  # a pipe, a log, captured output: nothing
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress.progress_bar(10, "export-peft", False) is None
    bar = progress.progress_bar(10, "export-peft", True, unit="target")
    pytest.importorskip("tqdm")
    bar.update(10)
    bar.close()
    assert "export-peft:" in terminal.getvalue() and "/10 " in terminal.getvalue()  # drawn on the terminal


# ---------------------------------------------------------------------------------- FSDP2 (two gloo processes)
def _fsdp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 6)))


def _fsdp_worker(rank: int, world: int, store: str, folder: str) -> None:
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from tensoradapt.torch.peft import folder as peft_folder

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = _fsdp_model()
        adapter = tat.attach(model, presets.lorta(3, 2), ["0.0", "1.0"])
        perturb(adapter)
        for block in model:
            fully_shard(block)
        fully_shard(model)
        writes = []
        original = peft_folder.write_folder
        peft_folder.write_folder = lambda *a, **k: (writes.append(a[0]), original(*a, **k))
        results = {}
        for rank_arg in (2, "exact"):
            out = tat.export_peft(adapter, os.path.join(folder, f"out-{rank_arg}"), rank=rank_arg)
            results[str(rank_arg)] = {"folder": str(out.folder), "ranks": dict(out.ranks), "errors": dict(out.errors)}
        blocker = os.path.join(folder, "a-file")
        if rank == 0:
            open(blocker, "w").close()
        dist.barrier()
        try:
            tat.export_peft(adapter, blocker, rank=2)  # a file: refused by the writing rank, raised on every rank
            results["failure"] = "none"
        except (ValueError, RuntimeError) as error:
            results["failure"] = type(error).__name__
        results["writes"] = len(writes)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp2_export_is_a_collective_written_by_rank0(tmp_path):
    import torch.multiprocessing as mp

    # fork (Linux): the workers start without importing this module again (transformers and peft take seconds)
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert (r0["writes"], r1["writes"]) == (2, 0)  # rank 0 alone wrote (twice); rank 1 never did
    assert (r0["failure"], r1["failure"]) == ("ValueError", "RuntimeError")
    assert r0["2"] == r1["2"] and r0["exact"] == r1["exact"]  # the same PeftExport on every rank
    model = _fsdp_model().eval()
    adapter = tat.attach(model, presets.lorta(3, 2), ["0.0", "1.0"])
    perturb(adapter)
    single = tat.export_peft(adapter, tmp_path / "single", rank="exact")
    assert dict(single.ranks) == r0["exact"]["ranks"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(_fsdp_model().eval(), str(tmp_path / "out-exact")).eval()
        assert rel(loaded(x), model(x)) <= 1e-5


def test_settings_are_documented_and_exported_where_they_are_read():
    """A setting patched where the documentation points must change what the code does: every
    ``:data:`tensoradapt.torch.….NAME``` of the bindings whose value is a number (a setting one
    tunes) names the module that defines ``NAME`` (a module-level assignment there, not an imported
    copy), and the package ``peft`` copies none of the SVD export's settings, which ``peft.svd``
    reads at each call."""
    import ast
    import importlib
    import inspect
    import re
    from pathlib import Path

    root = Path(tat.__file__).resolve().parent
    references = {ref for path in root.rglob("*.py")
                  for ref in re.findall(r":data:`~?(tensoradapt\.torch\.[\w.]+)`", path.read_text(encoding="utf-8"))}
    assert "tensoradapt.torch.peft.svd.EXACT_TOLERANCE" in references
    for reference in sorted(references):
        module_name, name = reference.rsplit(".", 1)
        module = importlib.import_module(module_name)
        if not isinstance(getattr(module, name), (int, float)):
            continue  # e.g. lycoris.KOHYA_PREFIXES: a documented constant, not a setting
        assigned = {target.id for node in ast.parse(inspect.getsource(module)).body
                    if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(target, ast.Name)}
        assert name in assigned, f":data:`{reference}`: {module_name} does not define {name} (a copy?)"
    for name in ("EXACT_TOLERANCE", "ONE_THREAD_SVD_SIDE", "PROGRESS_MIN_TARGETS"):
        assert hasattr(tat.peft.svd, name)
        assert not hasattr(tat.peft, name), f"tensoradapt.torch.peft.{name}: a copy that patching would not reach"
