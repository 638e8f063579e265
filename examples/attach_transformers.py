"""Attach SuperLoRA to a transformers GPT-2 built from a config (nothing is downloaded).

Trains LoRTA (a Tucker tensor over the cubic fold of all six ``c_attn`` weights at once) and LoRA
side by side for a few steps on a synthetic copy task, then saves, reloads into a fresh model,
merges and checks that the merged model gives the same logits.

    python examples/attach_transformers.py [--steps 40]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
import transformers

import tensoradapt.torch as tat
from tensoradapt import presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_embd=64, n_head=4, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout when comparing logits
    half = torch.randint(1, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([half, half], dim=1)  # learn to repeat the first half

    for name, adapter_config in [("LoRA r=4", presets.lora(4, alpha=8)), ("LoRTA M=3 r=8 G=1", presets.lorta(3, 8, 1))]:
        model = copy.deepcopy(base)
        adapter = tat.attach(model, adapter_config, ["c_attn"])
        opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=2e-2)
        start, first = time.perf_counter(), None
        model.train()
        for _ in range(args.steps):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        model.eval()
        print(f"{name:<20} trainable {adapter.num_params:>7,}  loss {first:.3f} -> {loss.item():.3f}  "
              f"({time.perf_counter() - start:.1f} s for {args.steps} steps)")

        with tempfile.TemporaryDirectory() as folder, torch.no_grad():
            path = adapter.save(Path(folder) / "adapter.safetensors")
            fresh = tat.load(copy.deepcopy(base), path)            # checks targets, shapes, dtypes
            logits = model(input_ids=ids).logits
            plain = fresh.merge_and_detach()                        # a plain GPT-2 again
            error = (plain(input_ids=ids).logits - logits).abs().max().item()
            print(f"{'':<20} saved {path.stat().st_size:,} bytes; merged vs adapted max |Δlogits| = {error:.2e}")
    print()
    print(adapter.summary().splitlines()[0])


if __name__ == "__main__":
    main()
