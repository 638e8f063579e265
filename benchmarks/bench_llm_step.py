"""One train step on an all-linear Llama-shaped model: tensoradapt against PEFT LoRA r=8 (issue 19).

Model: a ``LlamaForCausalLM`` built from a config (no download): hidden 1024, intermediate 2816,
8 layers, 16 heads, vocabulary 4096 (``--size small``: hidden 768, intermediate 2048, 6 layers);
every one of the seven linear projections of every layer is a target (PEFT's ``all-linear``
without the head).  Batch 2 × 128 tokens.  One step = forward, language-model loss, backward,
``AdamW.step`` over the adapter's tensors.

Each (configuration, round) runs in a fresh subprocess so that its peak resident memory belongs
to it alone; rounds interleave the configurations (odd rounds in reverse order).  Reported per
configuration: trainable parameters, the median step time (best median over rounds) and its ratio
to PEFT LoRA's in the same run, and the **peak extra memory** of training: peak RSS minus the RSS
just before the first step (model, data and optimiser set up), the part an adapter can change,
with its ratio to PEFT's.  The first step is included in the peak (AdamW allocates its states
there) and excluded from the times.

The row suffixed "maps stored" raises ``device_buffer_budget`` to 3 GiB so that generator-2
Fastfood keeps its maps (8 bytes per entry of ``L`` a direction) instead of recomputing them in
every pass; its first step builds them (included in the peak, excluded from the times).

Run ``python benchmarks/bench_llm_step.py`` (``--quick``: one round, two timed steps;
``--only lorta,lokr``: a subset, PEFT always included).  Unset ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` for a benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from _common import (
    RESULTS_DIR,
    ForeignLoad,
    command_line,
    disturbance_line,
    end_run,
    lm_train_step,
    machine_info,
    markdown_table,
    timed_steps,
    write_json,
)

SIZES = {
    "large": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16},
    "small": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, TOKENS, RANK, VOCAB = 2, 128, 8, 4096
BASELINE = "peft lora r=8"
BEFORE = " (before)"
#: A row suffix: generator-2 Fastfood maps kept on the device (tensoradapt.ops.projection.device_buffer_budget)
BUDGET = " maps stored"
BUDGET_BYTES = 3 << 30


def _configs() -> dict[str, Any]:
    from tensoradapt import presets

    lorta = presets.lorta(3, 32, 1)
    return {
        "ours lora r=8": presets.lora(RANK, alpha=2 * RANK),
        "ours lokr r=8": presets.lokr(RANK),
        "ours loha r=8": presets.loha(RANK),
        "ours lorta M=3 r=32 G=1": lorta,
        "ours lonkr K=2 r=8 G=1": presets.lonkr(2, 8, None, 1),
        "ours fastfood rho=0.1 lorta M=3 r=32 G=1": presets.with_projection(lorta, "fastfood", 0.1),
        "ours fastfood rho=0.1 lorta M=3 r=32 G=1" + BUDGET: presets.with_projection(lorta, "fastfood", 0.1),
        "ours fastfood rho=0.1 lorta M=3 r=32 G=layer": presets.with_projection(
            presets.lorta(3, 32, "layer"), "fastfood", 0.1),
        "ours fastfood rho=0.1 dense G=1": presets.with_projection(presets.dense(1), "fastfood", 0.1),
        "ours fastfood rho=0.01 dense G=1": presets.with_projection(presets.dense(1), "fastfood", 0.01),
    }


def _use_tree(tree: str) -> None:
    """Import ``tensoradapt`` (core, bindings, demo) from another checkout ``tree`` (a git worktree of
    an earlier commit), so that a "before" row runs in the same session as the rest."""
    import importlib.util

    where = {"tensoradapt": "tensoradapt", "tensoradapt.torch": "bindings/torch", "tensoradapt.demo": "demo"}

    class _Finder:
        @staticmethod
        def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
            if name not in where:
                return None
            folder = os.path.join(tree, where[name])
            return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                          submodule_search_locations=[folder])

    sys.meta_path.insert(0, _Finder)


def _worker(name: str, size: str, steps: int) -> dict[str, Any]:
    if name.endswith(BEFORE):
        _use_tree(os.environ["BENCH_BEFORE_TREE"])
        name = name.removesuffix(BEFORE)
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"],
                                      vocab_size=VOCAB, max_position_embeddings=TOKENS, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))
    if name == BASELINE:
        import peft

        lora = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0, bias="none")
        model = peft.get_peft_model(model, lora)
        params = [p for p in model.parameters() if p.requires_grad]
    import tensoradapt.torch as tat

    if name.endswith(BUDGET):
        from tensoradapt.ops.projection import device_buffer_budget

        device_buffer_budget(BUDGET_BYTES)  # the maps of L = 2^27 (1 GiB a direction) fit
    if name != BASELINE:
        adapter = tat.attach(model, _configs()[name], TARGETS)
        params = adapter.trainable_parameters()
    trainable = sum(p.numel() for p in params)
    step = lm_train_step(model, ids, params)
    record = timed_steps(step, steps, 1)
    targeted = sum(m.weight.numel() for n, m in model.named_modules()
                   if n.rsplit(".", 1)[-1] in TARGETS and hasattr(m, "weight") and m.weight is not None)
    return {"name": name, "module": tat.__file__ if name != BASELINE else "", "trainable": trainable, **record,
            "extra_mib": record["peak_rss_mib"] - record["rss_before_mib"],
            "targeted_weight_mib": targeted * 4 / 2**20, "torch_threads": torch.get_num_threads()}


def _run(name: str, size: str, steps: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", name, "--size", size, "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--quick", action="store_true", help="one round, 2 timed steps")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3; quick 2)")
    parser.add_argument("--only", default=None, help="comma-separated substrings of configuration names")
    parser.add_argument("--before", default=None,
                        help="a checkout of an earlier commit (git worktree add DIR COMMIT): its rows run too")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 3)
    if args.before:
        os.environ["BENCH_BEFORE_TREE"] = os.path.abspath(args.before)
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, args.size, steps)))
        return
    rounds = args.rounds or (1 if args.quick else 2)
    names = [BASELINE, *_configs()]
    if args.only:
        wanted = args.only.split(",")
        names = [BASELINE] + [n for n in names[1:] if any(w in n for w in wanted)]
    if args.before:
        names += [n + BEFORE for n in names[1:]]
    machine = machine_info()
    load = ForeignLoad()
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rec = _run(name, args.size, steps)
            runs[name].append(rec)
            print(f"round {r}: {name:<42} {rec['trainable']:>10,} params {rec['median_s'] * 1e3:8.0f} ms/step "
                  f"extra {rec['extra_mib']:7.0f} MiB", flush=True)
    elapsed = time.perf_counter() - started
    end = end_run(load, machine)
    best = {n: min(rs, key=lambda rec: rec["median_s"]) for n, rs in runs.items()}
    extra = {n: min(rec["extra_mib"] for rec in rs) for n, rs in runs.items()}
    rows = [[n, f"{best[n]['trainable']:,}", f"{extra[n]:.0f}", f"{extra[n] / extra[BASELINE]:.2f}×",
             f"{best[n]['median_s'] * 1e3:.0f}", f"{best[n]['median_s'] / best[BASELINE]['median_s']:.2f}×"]
            for n in names]
    print()
    print(f"Llama {args.size} ({SIZES[args.size]}), all-linear, batch {BATCH}×{TOKENS}; targeted weights "
          f"{best[BASELINE]['targeted_weight_mib']:.0f} MiB fp32")
    print(markdown_table(["adapter", "trainable", "peak extra MiB", "vs PEFT", "step ms (median)", "vs PEFT"], rows))
    print(disturbance_line(elapsed, end, machine))
    path = RESULTS_DIR / f"llm_step_{args.size}.json"
    write_json(path, {"command": command_line(argv), "machine": machine, "size": SIZES[args.size],
                      "batch": [BATCH, TOKENS], "rounds": rounds, "steps": steps, "runs": runs,
                      "disturbance": end})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
