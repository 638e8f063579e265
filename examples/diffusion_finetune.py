"""Fine-tune a tiny diffusers UNet with SuperLoRA on scikit-learn's digits, then export a LyCORIS file.

A ``UNet2DConditionModel`` is built from a small config (nothing is downloaded) and pre-trained
for a few steps as a denoiser of digits 0-4 (scikit-learn's 8x8 digits, upscaled to 16x16); each
image is conditioned on its label through cross-attention.  An adapter on the attention
projections and, LoCon-style, on the ResNet convolutions (``tat.diffusers_targets(unet,
resnets=True)``) then learns digits 5-9 with the base frozen, and goes out with
``tat.export_lycoris`` as one kohya-named ``.safetensors`` file (``lora_unet_…``) that ComfyUI,
LyCORIS and diffusers' ``load_lora_weights`` read.  The file is read back with
``tat.import_lycoris`` onto the pre-trained UNet to check it reproduces the fine-tuned outputs.
Under half a minute on one CPU core (25 s measured on a busy 2-core machine).

    pip install "torch==2.13.0" && pip install -e ".[diffusion]"      # diffusers (and LyCORIS for its loaders)
    python examples/diffusion_finetune.py [--steps 40] [--algo lora|lokr|loha|lorta] [--out FILE]

``--algo lorta`` (a Tucker tensor over every target at once) has no LyCORIS form: it goes out as
LoRA/LoCon of each target's exact-rank SVD, and the report shows each target's error.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

import tensoradapt.torch as tat
from tensoradapt import presets

CONFIGS = {"lora": presets.lora(4, alpha=8), "lokr": presets.lokr(4, alpha=8), "loha": presets.loha(4, alpha=8),
           "lorta": presets.lorta(3, 8)}


def digits(side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits (shipped with it) as ``(N, 1, side, side)`` in ``[-1, 1]``, and labels."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False), torch.tensor(labels)


def tiny_unet() -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of about 50k parameters for 16x16 one-channel images, from a config."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


class Denoising:
    """The DDPM noise-prediction loss on a set of digits, each conditioned on its label's embedding."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        from diffusers import DDPMScheduler

        self.x, self.y = x, y
        self.scheduler = DDPMScheduler(num_train_timesteps=100)
        self.labels = torch.randn(10, 1, 16, generator=torch.Generator().manual_seed(123))  # a fixed "text" encoder
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, ...]:
        pick = torch.randint(0, len(self.x), (size,), generator=self.generator)
        noise = torch.randn(size, 1, 16, 16, generator=self.generator)
        t = torch.randint(0, 100, (size,), generator=self.generator)
        return self.scheduler.add_noise(self.x[pick], noise, t), t, self.labels[self.y[pick]], noise

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        noisy, t, context, noise = batch
        return F.mse_loss(model(noisy, t, context).sample, noise)

    def train(self, model: torch.nn.Module, params: list[torch.nn.Parameter], steps: int, lr: float) -> None:
        optimizer = torch.optim.AdamW(params, lr=lr)
        model.train()
        for _ in range(steps):
            loss = self.loss(model, self.batch(16))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()


def main() -> None:
    """Pre-train the base, fine-tune the adapter, export it and read it back (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps (default 40)")
    parser.add_argument("--pretrain", type=int, default=20, help="pre-training steps of the base (default 20)")
    parser.add_argument("--algo", choices=sorted(CONFIGS), default="lora")
    parser.add_argument("--out", type=Path, default=None, help="the .safetensors file (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a model this small runs best on one)")
    args = parser.parse_args()
    if min(args.steps, args.pretrain) < 0 or args.threads < 1:
        parser.error(f"--steps and --pretrain must be >= 0 and --threads >= 1, got {args.steps}, {args.pretrain}, "
                     f"{args.threads}")
    if args.out is not None and args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {str(args.out)!r}")  # checked before any training
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x, y = digits()
    source, target = Denoising(x[y < 5], y[y < 5], seed=1), Denoising(x[y >= 5], y[y >= 5], seed=2)
    base = tiny_unet()
    source.train(base, list(base.parameters()), args.pretrain, lr=3e-3)

    unet = copy.deepcopy(base)
    adapter = tat.attach(unet, CONFIGS[args.algo], tat.diffusers_targets(unet, resnets=True))
    held_out = target.batch(32)
    with torch.no_grad():
        before = target.loss(unet, held_out).item()
    target.train(unet, adapter.trainable_parameters(), args.steps, lr=1e-2)
    with torch.no_grad():
        after = target.loss(unet, held_out).item()
    print(f"{args.algo}: {adapter.num_params:,} trainable parameters on {len(adapter.target_names)} targets; "
          f"held-out denoising loss on digits 5-9 {before:.4f} -> {after:.4f}")

    with tempfile.TemporaryDirectory() as folder:
        path = args.out or Path(folder) / f"digits_{args.algo}.safetensors"
        result = tat.export_lycoris(adapter, path)
        algos = ", ".join(f"{n} {a}" for a, n in sorted(Counter(result.algorithms.values()).items()))
        print(f"wrote {result.path} ({result.path.stat().st_size:,} bytes): {algos}; keys like "
              f"{next(iter(result.keys.values()))}; largest relative error {max(result.errors.values()):.1e}")
        fresh = copy.deepcopy(base)
        tat.import_lycoris(fresh, path)  # every check before the model is touched
        with torch.no_grad():
            noisy, t, context, _ = held_out
            gap = (fresh(noisy, t, context).sample - unet(noisy, t, context).sample).abs().max().item()
        print(f"read back onto the pre-trained UNet: max |Δ output| = {gap:.1e}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
