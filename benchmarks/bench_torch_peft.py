"""Training step time and peak memory: tensoradapt.torch.attach against PEFT LoRA, same model.

Model: a GPT-2 built from a config (no download): 6 layers, width 512, 8 heads, vocabulary 8192
(small so that the LM head does not drown the adapted layers), batch 8 × 128 tokens, targets
``c_attn`` (transformers' Conv1D, 512 → 1536) in every layer.  One training step = forward,
language-model loss, backward, ``AdamW.step`` over the adapter's tensors.

Every (configuration, round) runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``) belongs to it alone; rounds interleave the configurations.  Reported per
configuration: trainable parameters, median step time over the timed steps (best median over
rounds), the ratio to PEFT LoRA's in the same run, and peak RSS (whole process: Python, torch,
model, activations) with the ratio to PEFT's, plus the growth of RSS during training
(peak − RSS just before the first step) as the part the adapter can influence.

QLoRA-style rows (``qlora``): every ``c_attn`` replaced by a bitsandbytes ``Linear4bit`` (NF4, fp32
compute) holding the same weight, then ours LoRA against PEFT LoRA on that same 4-bit model
(ratios against ``peft qlora r=8``).

Run ``python benchmarks/bench_torch_peft.py`` (about 6 minutes on 2 cores; ``--quick``: one round,
fewer steps).  Needs ``pip install -e ".[bench]"`` (peft, transformers) and bitsandbytes for the
QLoRA rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    ForeignLoad,
    command_line,
    disturbance_line,
    end_run,
    lm_train_step,
    machine_info,
    timed_steps,
    write_json,
)

MODEL = {"n_layer": 6, "n_embd": 512, "n_head": 8, "vocab_size": 8192, "n_positions": 128}
BATCH, TOKENS, RANK = 8, 128, 8


def _configs() -> dict[str, Any]:
    from tensoradapt import presets

    return {
        "ours lora r=8": presets.lora(RANK, alpha=2 * RANK),
        "ours qlora r=8": presets.lora(RANK, alpha=2 * RANK),
        "ours lorta M=3 r=32 G=1": presets.lorta(3, 32, 1),
        "ours lorta M=4 r=16 G=1": presets.lorta(4, 16, 1),
        "ours lonkr K=2 r=8 G=weight": presets.lonkr(2, 8, None, "weight"),
        "ours fastfood rho=0.1 lorta M=3 r=32 G=1": presets.with_projection(presets.lorta(3, 32, 1), "fastfood", 0.1),
        "ours fastfood rho=0.01 lorta M=3 r=16 G=1": presets.with_projection(presets.lorta(3, 16, 1), "fastfood", 0.01),
    }


def _quantise_c_attn(model: Any) -> None:
    """Replace every ``c_attn`` Conv1D by a bitsandbytes NF4 ``Linear4bit`` with the same weight."""
    import bitsandbytes as bnb
    import torch

    for block in model.transformer.h:
        conv = block.attn.c_attn
        n, o = conv.weight.shape
        q = bnb.nn.Linear4bit(n, o, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(conv.weight.data.t().contiguous(), requires_grad=False, quant_type="nf4")
        q.bias = torch.nn.Parameter(conv.bias.data.clone(), requires_grad=False)
        block.attn.c_attn = q.to("cpu")


def _worker(name: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        **MODEL, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    if "qlora" in name:
        _quantise_c_attn(model)
    if name.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["c_attn"], lora_dropout=0.0,
                                 fan_in_fan_out="qlora" not in name, bias="none")
        model = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        import tensoradapt.torch as tat

        adapter = tat.attach(model, _configs()[name], ["c_attn"])
        params = adapter.trainable_parameters()
    trainable = sum(p.numel() for p in params)
    step = lm_train_step(model, ids, params)
    return {"name": name, "trainable": trainable, **timed_steps(step, steps, warmup),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 3 timed steps")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 6; quick 3)")
    parser.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 6)
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, steps, args.warmup)))
        return
    rounds = args.rounds or (1 if args.quick else 2)
    names = ["peft lora r=8", "peft qlora r=8", *_configs()]
    if args.only:
        wanted = args.only.split(",")
        chosen = [n for n in names if not n.startswith("peft") and any(w in n for w in wanted)]
        names = ((["peft lora r=8"] if any("qlora" not in n for n in chosen) else [])
                 + (["peft qlora r=8"] if any("qlora" in n for n in chosen) else []) + chosen)
    machine = machine_info()
    load = ForeignLoad()
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd = [sys.executable, __file__, "--worker", name, "--steps", str(steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(rec)
            print(f"round {r}: {name:<45} {rec['trainable']:>9,} params  {rec['median_s'] * 1e3:7.0f} ms/step  "
                  f"peak {rec['peak_rss_mib']:7.0f} MiB", flush=True)
    elapsed = time.perf_counter() - started
    end = end_run(load, machine)
    best = {n: min(rs, key=lambda rec: rec["median_s"]) for n, rs in runs.items()}
    peak = {n: min(rec["peak_rss_mib"] for rec in rs) for n, rs in runs.items()}
    growth = {n: min(rec["peak_rss_mib"] - rec["rss_before_mib"] for rec in rs) for n, rs in runs.items()}
    rows = []
    for n in names:
        base = "peft qlora r=8" if "qlora" in n else "peft lora r=8"
        rows.append([n, f"{best[n]['trainable']:,}", f"{best[n]['median_s'] * 1e3:.0f}",
                     f"{best[n]['median_s'] / best[base]['median_s']:.2f}×", f"{peak[n]:.0f}",
                     f"{peak[n] / peak[base]:.3f}×", f"{growth[n]:.0f}", f"{growth[n] / growth[base]:.2f}×"])
    header = ["configuration", "trainable", "step ms (median)", "vs PEFT", "peak RSS MiB", "vs PEFT",
              "RSS growth in training MiB", "vs PEFT"]
    from _common import markdown_table

    print()
    print(markdown_table(header, rows))
    print(disturbance_line(elapsed, end, machine))
    write_json(RESULTS_DIR / "torch_peft.json", {
        "command": command_line(argv), "machine": machine, "model": MODEL, "batch": [BATCH, TOKENS],
        "rounds": rounds, "steps": steps, "runs": runs, "disturbance": end,
    })
    print(f"results: {Path(RESULTS_DIR / 'torch_peft.json')}")


if __name__ == "__main__":
    main()
