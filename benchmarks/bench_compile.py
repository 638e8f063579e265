"""torch.compile on the first call for every preset (projections included): matches eager?
graph breaks per forward, compiled vs eager CPU step time.

For each configuration, ``step(params)`` is ``Σ_i ⟨ΔW_i, C_i⟩`` over the ΔW of
``tensoradapt.torch.functional.superlora_component_delta`` (one autograd node per component,
as the adapter uses it) followed by ``backward()``.  ``torch._dynamo.explain`` counts graphs and
graph breaks of the forward; ``torch.compile(backend=...)`` runs the first call and is compared
with eager (values and gradients, rtol 1e-5).  Timing: best of ``--reps`` steps after the first.
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Any

import torch
from _common import RESULTS_DIR, machine_info, write_json

from tensoradapt import SuperLoRA, buffers, presets
from tensoradapt.torch.functional import superlora_component_delta

SHAPES = [(64, 48), (64, 48), (32, 64)]


def _configs() -> list[tuple[str, Any, str | None]]:
    base = presets.lorta(3, 2, 1)
    return [
        ("lora r=4", presets.lora(4), None),
        ("lorta M=3 r=2 G=1", base, None),
        ("lonkr K=2 r=2", presets.lonkr(2, 2, 4, 1), None),
        ("loha r=2", presets.loha(2), None),
        ("lokr r=2", presets.lokr(2), None),
        ("krona", presets.krona(), None),
        ("lotr r=2", presets.lotr(2), None),
        ("dense", presets.dense(), None),
        ("shuffle", presets.with_projection(base, "shuffle"), None),
        ("fastfood rho=0.1 (generator 1)", presets.with_projection(base, "fastfood", 0.1), buffers.GENERATOR_V1),
        ("fastfood rho=0.1 (generator 2)", presets.with_projection(base, "fastfood", 0.1), buffers.GENERATOR_V2),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="aot_eager,inductor")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    rows = []
    for name, config, generator in _configs():
        if args.only not in name:
            continue
        shapes = SHAPES[:2] if "lotr" in name else SHAPES
        try:
            plan = SuperLoRA(config, shapes, generator=generator)
        except Exception as error:  # a preset that does not fit these shapes
            print(f"{name}: skipped ({error})")
            continue
        init = {k: torch.from_numpy(v) for k, v in plan.init(0, zero=False).items()}
        weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        components = plan.components()

        def loss(params: dict[str, torch.Tensor], plan=plan, components=components, weights=weights) -> torch.Tensor:
            total = torch.zeros(())
            for targets, groups in components:
                names = plan.parameter_shapes(groups)
                deltas = superlora_component_delta(plan, targets, {n: params[n] for n in names})
                for i, d in zip(targets, deltas, strict=True):
                    total = total + (d * weights[i]).sum()
            return total

        def step(fn: Any, init=init) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
            params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
            start = time.perf_counter()
            out = fn(params)
            out.backward()
            return out.detach(), {k: v.grad for k, v in params.items()}, time.perf_counter() - start

        ref, ref_grads, _ = step(loss)
        eager_s = min(step(loss)[2] for _ in range(args.reps))
        row: dict[str, Any] = {"config": name, "eager_step_s": eager_s}
        try:
            explanation = torch._dynamo.explain(loss)({k: v.clone() for k, v in init.items()})
            row["graphs"], row["graph_breaks"] = explanation.graph_count, explanation.graph_break_count
            row["break_reasons"] = sorted({str(b.reason).splitlines()[0][:160] for b in explanation.break_reasons})
            row["components"] = len(components)
        except Exception as error:
            row["explain_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        for backend in args.backends.split(","):
            torch._dynamo.reset()
            compiled = torch.compile(loss, backend=backend)
            try:
                out, grads, first_s = step(compiled)
                ok = torch.allclose(out, ref, rtol=1e-5, atol=1e-6) and all(
                    torch.allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6) for k in ref_grads)
                best = min(step(compiled)[2] for _ in range(args.reps))
                row[backend] = {"first_call_ok": True, "matches_eager": bool(ok), "first_call_s": first_s,
                                "step_s": best, "vs_eager": best / eager_s}
            except Exception as error:
                row[backend] = {"first_call_ok": False,
                                "error": f"{type(error).__name__}: {str(error).splitlines()[0][:240]}",
                                "trace_tail": traceback.format_exc().splitlines()[-4:]}
        rows.append(row)
        print(row, flush=True)
    write_json(RESULTS_DIR / "compile.json", {"benchmark": "compile", "machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
