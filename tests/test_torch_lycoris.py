"""LyCORIS / kohya files both ways (tensoradapt.torch.export_lycoris / import_lycoris), against the peers.

* files we write are loaded by LyCORIS's own kohya loader (``lycoris.kohya.create_network_from_weights``,
  what kohya-ss' scripts call) and by its generic one (``lycoris.create_lycoris_from_weights``) onto a
  copy of the model, applied and merged, with our adapter's outputs;
* LoRA/LoCon files load with diffusers' ``StableDiffusionPipeline.load_lora_weights`` on a tiny
  pipeline built from configs (UNet and text encoder, no download);
* files LyCORIS writes (``save_weights`` of a network it created) import to LyCORIS's outputs;
* hostile files end in ``AdapterFileError`` with the model bit-identical.

Every model is a few thousand parameters; the file runs in well under a minute on two busy cores.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import struct
import warnings

import pytest

torch = pytest.importorskip("torch")
lycoris = pytest.importorskip("lycoris")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from lycoris.kohya import create_network, create_network_from_weights  # noqa: E402
from torch import nn  # noqa: E402

import tensoradapt  # noqa: E402
import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import GLoRAConfig, LayerChoice, presets  # noqa: E402
from tensoradapt._safetensors import read_header  # noqa: E402
from tensoradapt.torch import AdapterFileError  # noqa: E402
from tensoradapt.torch.lycoris import kohya_prefix  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TOL = 1e-5


# ---------------------------------------------------------------------------------- models
def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


def tiny_text_encoder() -> nn.Module:
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8, projection_dim=16)
    return transformers.CLIPTextModel(config).eval()


class Net(nn.Module):
    """Linear and conv layers of unequal shapes (no diffusers needed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 12)
        self.c = nn.Conv2d(4, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x, img):
        return torch.cat([self.b(torch.tanh(self.a(x))).flatten(), self.d(torch.tanh(self.c(img))).flatten()])


class MLP(nn.Sequential):
    """Linear layers LyCORIS's LoKr factorises with low-rank blocks (64 = 8 x 8)."""

    def __init__(self) -> None:
        torch.manual_seed(5)
        super().__init__(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only contend (a UNet forward takes 10 ms on one thread
    and seconds on two busy ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


#: LyCORIS 4.1.3's kohya network matches a diffusers UNet's time embedding twice (the class
#: ``TimestepEmbedding`` in its module list, ``time_embedding.linear_1`` in its name list) and then
#: asserts on the duplicate name; this preset targets the attention and ResNet blocks (LoRA + LoCon).
UNET_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
"""


@pytest.fixture
def kohya_preset(tmp_path, monkeypatch):
    """LyCORIS's kohya network on :data:`UNET_PRESET` (its class attributes restored afterwards)."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.utils.preset import read_preset

    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))
    path = tmp_path / "preset.toml"
    path.write_text(UNET_PRESET)
    LycorisNetworkKohya.apply_preset(read_preset(str(path)))
    return str(path)


def unet_out(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return model(sample, torch.tensor([10]), context).sample


def net_out(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        return model(torch.randn(3, 16, generator=g), torch.randn(2, 4, 6, 6, generator=g))


def mlp_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(3, 64, generator=torch.Generator().manual_seed(9)))


def randomize(params, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not hasattr(model, "tensoradapt")
    assert all(p.requires_grad for p in model.parameters())


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------------- our files, LyCORIS's loaders
CONFIGS = {"lora": presets.lora(2, 4.0), "loha": presets.loha(2, 3.0), "lokr": presets.lokr(2, alpha=5.0)}


@pytest.mark.parametrize("algo", sorted(CONFIGS))
def test_lycoris_kohya_loader_applies_our_unet_files(unet, tmp_path, kohya_preset, algo):
    model = copy.deepcopy(unet)
    targets = tat.diffusers_targets(model, resnets=True)
    adapter = tat.attach(model, CONFIGS[algo], targets)
    randomize(adapter.trainable_parameters())
    want = unet_out(model)
    result = tat.export_lycoris(adapter, tmp_path / "unet.safetensors")
    assert all(k.startswith("lora_unet_") for k in result.keys.values())
    algos = set(result.algorithms.values())
    # LoKr blocks of a conv laid out apart from LyCORIS's go out as an exact LoCon
    assert algos == {"lora", "locon"} if algo == "lora" else algo in algos
    assert max(result.errors.values()) <= tat.peft.svd.EXACT_TOLERANCE
    peer = copy.deepcopy(unet)
    network, _ = create_network_from_weights(1.0, str(result.path), None, None, peer)
    network.apply_to(None, peer, apply_text_encoder=False, apply_unet=True)
    assert len(network.unet_loras) == len(targets)
    assert close(unet_out(peer), want) < TOL
    back = copy.deepcopy(unet)  # and back: one adapter per algorithm of the file, all active
    tat.import_lycoris(back, result.path)
    assert len(back.tensoradapt.names) == len({"lora" if a == "locon" else a for a in algos})
    assert close(unet_out(back), want) < TOL


@pytest.mark.parametrize("config", [presets.lora(3, 6.0), presets.loha(2, 2.0), presets.lokr(2, alpha=2.0)],
                         ids=["lora", "loha", "lokr"])
def test_lycoris_merges_our_files(tmp_path, config):
    # LyCORIS 4.1.3 merges LoHa/LoKr with its scale applied twice (get_diff_weight rescales get_weight),
    # so merged outputs are compared at scale 1 for those; LoRA at scale 2
    model = Net()
    adapter = tat.attach(model, config, ["a", "b", "c", "d"])
    randomize(adapter.trainable_parameters())
    want = net_out(model)
    path = tat.export_lycoris(adapter, tmp_path / "net.safetensors", prefix="lycoris").path
    peer = Net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(path), peer)
    network.merge_to(1.0)
    assert close(net_out(peer), want) < TOL


def test_lycoris_applies_our_low_rank_lokr_and_it_round_trips(tmp_path):
    # 64 = 8 x 8 blocks of rank 2 < 8/2: w1_a/w1_b and w2_a/w2_b, scale alpha/r = 2.5
    model = MLP()
    adapter = tat.attach(model, presets.lokr(2, decompose_both=True, alpha=5.0), ["0", "2"])
    randomize(adapter.trainable_parameters(), std=0.3)
    want = mlp_out(model)
    result = tat.export_lycoris(adapter, tmp_path / "lokr.safetensors", prefix="lycoris")
    assert set(result.algorithms.values()) == {"lokr"} and set(result.ranks.values()) == {2}
    assert {k.split(".")[1] for k in safetensors_torch.load_file(str(result.path))} == {
        "alpha", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    peer = MLP()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(result.path), peer)
    network.apply_to()
    assert close(mlp_out(peer), want) < TOL
    back = MLP()
    imported = tat.import_lycoris(back, result.path)
    assert imported.config.decompose_both and imported.config.alpha == 5.0
    assert close(mlp_out(back), want) < TOL


def test_grouped_and_projected_adapters_export_as_lora_with_errors(tmp_path):
    model = Net()
    adapter = tat.attach(model, presets.lorta(3, 2), ["a", "b", "c", "d"])
    randomize(adapter.trainable_parameters())
    want = net_out(model)
    exact = tat.export_lycoris(adapter, tmp_path / "exact.safetensors", prefix="lycoris")
    assert set(exact.algorithms.values()) == {"lora", "locon"}
    assert max(exact.errors.values()) <= tat.peft.svd.EXACT_TOLERANCE
    peer = Net()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(exact.path), peer)
    network.apply_to()
    assert close(net_out(peer), want) < TOL
    # rank 1: each error is the Eckart–Young tail of the exact ΔW's singular values
    low = tat.export_lycoris(adapter, tmp_path / "low.safetensors", rank=1)
    assert set(low.ranks.values()) == {1} and "largest relative error" in str(low)
    tensors = safetensors_torch.load_file(str(exact.path))
    for name, key in exact.keys.items():
        up = tensors[f"{key}.lora_up.weight"].double().flatten(1)
        delta = up @ tensors[f"{key}.lora_down.weight"].double().flatten(1)
        s = torch.linalg.svdvals(delta)
        assert low.errors[name] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4, abs=1e-6)


def test_svd_export_runs_small_svds_on_one_thread_as_export_peft(tmp_path, monkeypatch):
    """export_lycoris's SVDs use export_peft's thread guard: one thread for small CPU targets, the
    caller's thread count restored after, and as set when a target is above ONE_THREAD_SVD_SIDE."""
    adapter = tat.attach(Net(), presets.lorta(3, 2), ["a", "b"])
    randomize(adapter.trainable_parameters())
    seen = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: seen.append(torch.get_num_threads()) or real_svd(*a, **k))
    previous = torch.get_num_threads()  # 1 (the module's fixture)
    torch.set_num_threads(2)
    try:
        result = tat.export_lycoris(adapter, tmp_path / "one.safetensors", rank="exact")
        assert seen == [1, 1] and torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr("tensoradapt.torch.peft.svd.ONE_THREAD_SVD_SIDE", 8)  # a target above it: as set
        again = tat.export_lycoris(adapter, tmp_path / "two.safetensors", rank="exact")
        assert seen == [2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert again.ranks == result.ranks
    assert max(abs(again.errors[n] - result.errors[n]) for n in result.errors) <= 1e-7


def test_glora_exports_as_lora_and_reports_dropped_bias(tmp_path):
    model = MLP()
    adapter = tat.attach(model, GLoRAConfig(rank=2), ["0", "2"])
    randomize(adapter.trainable_parameters(), std=0.1)
    adapter.set_configs([LayerChoice(A="lora", B="lora", rank=2)] * 2)
    model.eval()
    want = mlp_out(model)
    result = tat.export_lycoris(adapter, tmp_path / "glora.safetensors", prefix="lycoris")
    assert set(result.algorithms.values()) == {"lora"}
    assert max(result.errors.values()) <= tat.peft.svd.EXACT_TOLERANCE
    peer = MLP()
    network, _ = lycoris.create_lycoris_from_weights(1.0, str(result.path), peer)
    network.apply_to()
    assert close(mlp_out(peer), want) < TOL
    adapter.set_configs([LayerChoice(A="lora", B="lora", E="vector", rank=2)] * 2)
    with pytest.warns(UserWarning, match="bias updates are dropped"):
        biased = tat.export_lycoris(adapter, tmp_path / "biased.safetensors")
    assert min(biased.errors.values()) > 1e-3


# ---------------------------------------------------------------------------------- diffusers
def test_diffusers_load_lora_weights_reads_unet_and_text_encoder_parts(unet, tmp_path):
    base_te = tiny_text_encoder()
    parts = nn.ModuleDict({"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(base_te)})
    targets = [f"unet.{n}" for n in tat.diffusers_targets(parts["unet"], resnets=True)]
    # kohya's text-encoder attention targets (diffusers infers the file's layout from out_proj's key)
    targets += [n for n, _ in parts.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    adapter = tat.attach(parts, presets.lora(2, 4.0), targets)
    randomize(adapter.trainable_parameters())
    ids = torch.tensor([[1, 5, 9, 2]])
    want_unet = unet_out(parts["unet"])
    with torch.no_grad():
        want_te = parts["text_encoder"](ids)[0]
    result = tat.export_lycoris(adapter, tmp_path / "sd.safetensors")
    prefixes = {k.split("_")[1] for k in result.keys.values()}
    assert prefixes == {"unet", "te"}
    torch.manual_seed(2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, sample_size=8)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(base_te), tokenizer=None, unet=copy.deepcopy(unet),
        scheduler=diffusers.DDPMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.path))
    assert close(unet_out(pipe.unet), want_unet) < TOL
    with torch.no_grad():
        assert close(pipe.text_encoder(ids)[0], want_te) < TOL


def test_default_targets_of_diffusers_models(unet, tmp_path):
    names = tat.default_targets(unet)
    assert names and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    assert len(names) == 4 * sum(1 for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2")))
    convs = tat.diffusers_targets(unet, resnets=True)
    assert set(names) < set(convs) and any(n.endswith("resnets.0.conv1") for n in convs)
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                          pos_embed_max_size=16)
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    for model in (sd3, flux):
        found = tat.default_targets(model)
        assert "transformer_blocks.0.attn.to_q" in found and "transformer_blocks.0.attn.to_out.0" in found
        assert kohya_prefix(model) == "lora_transformer"
    adapter = tat.attach(flux, presets.lora(2))
    result = tat.export_lycoris(adapter, tmp_path / "flux.safetensors")
    assert all(k.startswith("lora_transformer_") for k in result.keys.values())
    assert kohya_prefix(unet) == "lora_unet" and kohya_prefix(tiny_text_encoder()) == "lora_te"


# ---------------------------------------------------------------------------------- LyCORIS's files, our import
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_lycoris_kohya_files_import_to_equal_outputs(unet, tmp_path, kohya_preset, algo):
    peer = copy.deepcopy(unet)
    network = create_network(1.0, 4, 2.0, None, None, peer, algo=algo, conv_dim=2, conv_alpha=1.0,
                             preset=kohya_preset)
    network.apply_to(None, peer, apply_text_encoder=False, apply_unet=True)
    randomize(network.parameters(), std=0.3)
    want = unet_out(peer)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), None, {})
    model = copy.deepcopy(unet)
    adapter = tat.import_lycoris(model, path)
    assert len(adapter.target_names) == len(network.unet_loras)
    assert close(unet_out(model), want) < TOL
    adapter.save(tmp_path / "ours.safetensors")  # an ordinary tensoradapt adapter from here on


def test_lycoris_lokr_files_import_to_equal_outputs(tmp_path):
    peer = MLP()
    network = lycoris.create_lycoris(peer, 1.0, linear_dim=2, linear_alpha=3.0, algo="lokr", decompose_both=True)
    network.apply_to()
    randomize(network.parameters(), std=0.3)
    want = mlp_out(peer)
    path = tmp_path / "lokr.safetensors"
    network.save_weights(str(path), None, {})
    assert {k.split(".")[1] for k in safetensors_torch.load_file(str(path))} >= {"lokr_w1_a", "lokr_w2_a"}
    model = MLP()
    adapter = tat.import_lycoris(model, path)
    assert adapter.config.decompose_both
    assert close(mlp_out(model), want) < TOL


def test_lycoris_conv_lokr_outside_our_layout_is_refused_untouched(unet, tmp_path, kohya_preset):
    peer = copy.deepcopy(unet)
    network = create_network(1.0, 2, 1.0, None, None, peer, algo="lokr", preset=kohya_preset)
    network.apply_to(None, peer, apply_text_encoder=False, apply_unet=True)
    randomize(network.parameters())
    path = tmp_path / "lokr.safetensors"
    network.save_weights(str(path), None, {})
    model = copy.deepcopy(unet)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="lays out"):
        tat.import_lycoris(model, path)
    assert_untouched(model, before)


def test_prefixes_round_trip_and_select_a_component(tmp_path):
    model = Net()
    adapter = tat.attach(model, presets.lora(2), ["a", "b", "c", "d"])
    randomize(adapter.trainable_parameters())
    want = net_out(model)
    path = tat.export_lycoris(adapter, tmp_path / "te1.safetensors", prefix="lora_te1").path
    tensors = safetensors_torch.load_file(str(path))
    assert all(k.startswith("lora_te1_") for k in tensors)
    tensors.update({"lora_te2_x.lora_up.weight": torch.zeros(3, 1), "lora_te2_x.lora_down.weight": torch.zeros(1, 3)})
    safetensors_torch.save_file(tensors, str(tmp_path / "two.safetensors"))
    with pytest.raises(AdapterFileError, match="does not have"):
        tat.import_lycoris(Net(), tmp_path / "two.safetensors")
    fresh = Net()
    tat.import_lycoris(fresh, tmp_path / "two.safetensors", prefix="lora_te1")
    assert close(net_out(fresh), want) < TOL
    # from our own adapter file (no model): the same tensors
    adapter.save(tmp_path / "ours.safetensors")
    again = tat.export_lycoris(tmp_path / "ours.safetensors", tmp_path / "again.safetensors", prefix="lora_te1")
    assert safetensors_torch.load_file(str(again.path)).keys() == safetensors_torch.load_file(str(path)).keys()


def test_pipeline_components_get_their_kohya_prefixes(tmp_path):
    def parts() -> nn.ModuleDict:
        torch.manual_seed(6)
        return nn.ModuleDict({"unet": nn.Sequential(nn.Linear(4, 6)), "text_encoder": nn.Sequential(nn.Linear(4, 4)),
                              "text_encoder_2": nn.Sequential(nn.Linear(4, 5))})

    model = parts()
    adapter = tat.attach(model, presets.lora(2), ["unet.0", "text_encoder.0", "text_encoder_2.0"])
    randomize(adapter.trainable_parameters())
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = [m(x) for m in model.values()]
    result = tat.export_lycoris(adapter, tmp_path / "sdxl.safetensors")
    assert list(result.keys.values()) == ["lora_unet_0", "lora_te1_0", "lora_te2_0"]
    fresh = parts()
    tat.import_lycoris(fresh, result.path)
    with torch.no_grad():
        assert all(close(m(x), w) < TOL for m, w in zip(fresh.values(), want, strict=True))
    before = snapshot(fresh)
    with pytest.raises(RuntimeError, match="already has an adapter named 'default'"):
        tat.import_lycoris(fresh, result.path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_missing_alpha_is_lycoris_default(tmp_path):
    model = Net()
    adapter = tat.attach(model, presets.lora(2), ["a", "b", "c", "d"])  # scale 1: alpha = r
    randomize(adapter.trainable_parameters())
    want = net_out(model)
    path = tat.export_lycoris(adapter, tmp_path / "net.safetensors").path
    tensors = {k: v for k, v in safetensors_torch.load_file(str(path)).items() if not k.endswith(".alpha")}
    safetensors_torch.save_file(tensors, str(tmp_path / "bare.safetensors"))
    fresh = Net()
    tat.import_lycoris(fresh, tmp_path / "bare.safetensors")
    assert close(net_out(fresh), want) < TOL


# ---------------------------------------------------------------------------------- metadata, writing
def test_metadata_records_the_source_and_writes_are_atomic(tmp_path):
    model = Net()
    adapter = tat.attach(model, presets.lokr(2, alpha=5.0), ["a", "b"])
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"old")
    tat.export_lycoris(adapter, path)
    meta = read_header(path).metadata
    assert json.loads(meta["tensoradapt_config"]) == adapter.config.to_dict()
    assert meta["tensoradapt_version"] == tensoradapt.__version__ and meta["tensoradapt_method"] == "superlora"
    assert [t["algo"] for t in json.loads(meta["tensoradapt_targets"])] == ["lokr", "lokr"]
    assert not list(tmp_path.glob(".*.tmp"))
    ours = tmp_path / "adapter.safetensors"
    adapter.save(ours)
    data = ours.read_bytes()
    with pytest.raises(ValueError, match="holds a tensoradapt adapter"):
        tat.export_lycoris(adapter, ours)
    assert ours.read_bytes() == data
    for bad, error in (({"prefix": "lora.unet"}, ValueError), ({"rank": 0}, ValueError),
                       ({"rank": 1.5}, TypeError), ({"path": tmp_path / "x.pt"}, ValueError)):
        kwargs = {"path": path, **bad}
        with pytest.raises(error):
            tat.export_lycoris(adapter, **kwargs)


def test_targets_kohya_files_cannot_hold_are_refused(tmp_path):
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4)})
    adapter = tat.attach(model, presets.lora(2), ["emb", "lin"])
    with pytest.raises(ValueError, match=r"nn\.Embedding"):
        tat.export_lycoris(adapter, tmp_path / "unused.safetensors")
    clash = nn.ModuleDict({"a_b": nn.ModuleDict({"c": nn.Linear(4, 4)}), "a": nn.ModuleDict({"b_c": nn.Linear(4, 4)})})
    adapter = tat.attach(clash, presets.lora(2), ["a_b.c", "a.b_c"])
    with pytest.raises(ValueError, match="cannot tell them apart"):
        tat.export_lycoris(adapter, tmp_path / "unused.safetensors")


# ---------------------------------------------------------------------------------- hostile files
def _rank_up(t):
    t["lora_unet_a.lora_down.weight"] = torch.zeros(3, 16)


def _nan(t):
    t["lora_unet_b.lora_up.weight"][0, 0] = float("nan")


def _inf_alpha(t):
    t["lora_unet_c.alpha"] = torch.tensor(float("inf"))


def _mixed_module(t):
    t["lora_unet_a.hada_w1_a"] = torch.zeros(32, 2)


HOSTILE = {
    "wrong shape": (_rank_up, "do not fit Linear 'a'"),
    "conv up not 1x1": (lambda t: t.update({"lora_unet_c.lora_up.weight": torch.zeros(8, 2, 3, 3)}), "lora_up"),
    "unknown suffix": (lambda t: t.update({"lora_unet_a.lora_left.weight": torch.zeros(1)}), "unknown suffix"),
    "tucker core": (lambda t: t.update({"lora_unet_c.lora_mid.weight": torch.zeros(2, 2, 3, 3)}), "Tucker"),
    "dora": (lambda t: t.update({"lora_unet_a.dora_scale": torch.ones(32, 1)}), "DoRA"),
    "no key suffix": (lambda t: t.update({"lora_unet_a": torch.zeros(1)}), "unknown suffix"),
    "alpha only": (lambda t: [t.pop(k) for k in list(t) if k.startswith("lora_unet_d.lora")], "no adapter tensors"),
    "incomplete": (lambda t: t.pop("lora_unet_d.lora_down.weight"), "needs"),
    "alpha not scalar": (lambda t: t.update({"lora_unet_a.alpha": torch.ones(2)}), "not a scalar"),
    "nan": (_nan, "NaN"),
    "inf alpha": (_inf_alpha, "NaN or infinite"),
    "int dtype": (lambda t: t.update({"lora_unet_a.alpha": torch.tensor(2)}), "not a float"),
    "unknown module": (lambda t: t.update({"lora_unet_zz.alpha": torch.tensor(1.0)}), "does not have"),
    "mixed in a module": (_mixed_module, "mixes"),
    "huge rank": (lambda t: t.update({"lora_unet_a.lora_down.weight": torch.zeros(0, 16),
                                       "lora_unet_a.lora_up.weight": torch.zeros(32, 0)}), "rank 0"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_kohya_files_leave_the_model_bit_identical(tmp_path, case):
    source = Net()
    adapter = tat.attach(source, presets.lora(2, 4.0), ["a", "b", "c", "d"])
    randomize(adapter.trainable_parameters())
    good = tat.export_lycoris(adapter, tmp_path / "good.safetensors", prefix="lora_unet").path
    tensors = safetensors_torch.load_file(str(good))
    mutate, message = HOSTILE[case]
    mutate(tensors)
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(tensors, str(bad))
    model = Net()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        tat.import_lycoris(model, bad)
    assert_untouched(model, before)


@pytest.mark.parametrize("damage", ["truncated", "header length", "not safetensors"])
def test_corrupted_files_are_refused_before_reading(tmp_path, damage):
    source = Net()
    adapter = tat.attach(source, presets.lora(2), ["a", "b"])
    data = tat.export_lycoris(adapter, tmp_path / "good.safetensors").path.read_bytes()
    if damage == "truncated":
        data = data[:-5]
    elif damage == "header length":
        data = struct.pack("<Q", 10**12) + data[8:]
    else:
        data = b"{}" * 10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    model = Net()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="corrupted"):
        tat.import_lycoris(model, bad)
    assert_untouched(model, before)
    with pytest.raises(FileNotFoundError):
        tat.import_lycoris(model, tmp_path / "missing.safetensors")


def test_import_keeps_lycoris_scale_rules_across_ranks(tmp_path):
    # one file, modules of different ranks and alphas: one adapter of the largest rank, scales folded
    model = Net()
    tensors = {}
    g = torch.Generator().manual_seed(4)
    shapes = {"a": ((32, 16), 3, 6.0), "b": ((12, 32), 1, None), "c": ((8, 4, 3, 3), 2, 0.0),
              "d": ((4, 8, 1, 1), 2, 1.0)}
    expected = {}
    for name, (shape, r, alpha) in shapes.items():
        up = torch.randn(shape[0], r, *(1,) * (len(shape) - 2), generator=g)
        down = torch.randn(r, *shape[1:], generator=g)
        tensors[f"lora_unet_{name}.lora_up.weight"] = up
        tensors[f"lora_unet_{name}.lora_down.weight"] = down
        if alpha is not None:
            tensors[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
        scale = 1.0 if not alpha else alpha / r  # missing alpha or 0: alpha = r
        expected[name] = (up.flatten(1) @ down.flatten(1) * scale).reshape(shape)
    safetensors_torch.save_file(tensors, str(tmp_path / "mixed.safetensors"))
    reference = Net()
    with torch.no_grad():
        for name, delta in expected.items():
            getattr(reference, name).weight += delta
    adapter = tat.import_lycoris(model, tmp_path / "mixed.safetensors")
    assert adapter.config.ranks[0] == 3
    assert close(net_out(model), net_out(reference)) < TOL
    assert math.isfinite(float(net_out(model).sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tat.export_lycoris(adapter, tmp_path / "back.safetensors")


def test_diffusion_example_runs(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parent.parent / "examples" / "diffusion_finetune.py"
    spec = importlib.util.spec_from_file_location("diffusion_finetune", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "digits.safetensors"
    monkeypatch.setattr(sys, "argv", ["diffusion_finetune.py", "--steps", "3", "--pretrain", "2", "--algo", "lokr",
                                      "--out", str(out)])
    example.main()
    printed = capsys.readouterr().out
    assert "lokr" in printed and "read back" in printed
    assert read_header(out).metadata["tensoradapt_method"] == "superlora"
    assert float(printed.split("max |Δ output| = ")[1].split()[0]) < TOL
