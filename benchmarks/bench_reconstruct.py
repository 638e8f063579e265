"""Benchmark of Tucker, CP and Kronecker reconstruction and their VJPs against tensorly (CPU).

Float32, on the same NumPy inputs for ours and tensorly, plus ours on torch CPU tensors:

* **Tucker**: core ``r^M`` (r = 8), factors ``d × r``; ours ``tucker_to_tensor(core, factors)``
  against ``tensorly.tucker_to_tensor((core, factors))``.  VJP: ours ``tucker_vjp`` against a
  tensorly reference, the core gradient ``multi_mode_dot(X̄, factors, transpose=True)`` plus, per
  mode m, ``unfold(multi_mode_dot(X̄, factors, skip=m, transpose=True), m) @ unfold(C, m)ᵀ``.
* **CP**: rank R = 16 with weights; ours ``cp_to_tensor(weights, factors)`` against
  ``tensorly.cp_to_tensor((weights, factors))``.  VJP: ours ``cp_vjp`` against
  ``tensorly.tenalg.unfolding_dot_khatri_rao`` for every mode (the weights gradient is then
  ``Σ_i A_1 ⊙ Ā_1 / λ``, which costs nothing extra).
* **Kronecker**: K = 2..4 equal splits of side s (matrices, M = 2, and tensors, M = 3..5); ours
  ``kron(splits)`` against ``tensorly.tenalg.kronecker(splits)``.  VJP: ours ``kron_vjp`` against
  one ``np.einsum`` per split with a precomputed path (tensorly has no Kronecker VJP).

Sizes: M = 3, 4, 5 and d = 16, 32, 64 (Kronecker: output side d = s^K), skipping outputs over
128 MiB.  Every result (forward and each gradient, NumPy and torch) is checked against the
reference with ``allclose`` before it is timed.  Timing: best of repeated calls after one warm-up
(see ``_common.best_time``), in three interleaved rounds of ours and the reference (best over
rounds), so that both see the same phases of a noisy machine.

Usage::

    python benchmarks/bench_reconstruct.py           # default run, about three minutes
    python benchmarks/bench_reconstruct.py --quick   # fewer repeats, outputs <= 16 MiB

A markdown table goes to stdout and the raw numbers to ``benchmarks/results/reconstruct.json``.
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorly as tl
from _common import (
    DISTURBED,
    RESULTS_DIR,
    ForeignLoad,
    add_timing_arguments,
    best_time,
    command_line,
    disturbance_line,
    disturbed,
    end_run,
    fmt_ms,
    fmt_ratio,
    machine_info,
    markdown_table,
    merge_round,
    timing_settings,
    write_json,
)

import tensoradapt
from tensoradapt.ops import cp_to_tensor, cp_vjp, kron, kron_vjp, tucker_to_tensor, tucker_vjp

TUCKER_RANK = 8
CP_RANK = 16
ORDERS = (3, 4, 5)
SIDES = (16, 32, 64)
# Kronecker cases (M, K, s): K equal splits of shape (s,)*M, output side s**K.
KRON_CASES = (
    (2, 2, 32), (2, 2, 64), (2, 3, 16), (2, 4, 8),
    (3, 2, 4), (3, 4, 2), (3, 2, 8), (3, 3, 4),
    (4, 2, 4), (4, 4, 2), (4, 2, 8), (4, 3, 4),
    (5, 2, 4), (5, 4, 2),
)
TARGETS = {"tucker": 0.8, "cp": 0.6}  # ours / tensorly forward time, at every size
RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# References


def tucker_vjp_reference(core: np.ndarray, factors: list[np.ndarray], cot: np.ndarray):
    """Tucker VJP with tensorly: M + 1 independent projections of the cotangent."""
    core_grad = tl.tenalg.multi_mode_dot(cot, factors, transpose=True)
    grads = []
    for m in range(core.ndim):
        proj = tl.tenalg.multi_mode_dot(cot, factors, skip=m, transpose=True)
        grads.append(tl.dot(tl.unfold(proj, m), tl.transpose(tl.unfold(core, m))))
    return core_grad, grads


def tucker_core_grad_reference(factors: list[np.ndarray], cot: np.ndarray):
    return tl.tenalg.multi_mode_dot(cot, factors, transpose=True)


def cp_vjp_reference(weights: np.ndarray, factors: list[np.ndarray], cot: np.ndarray):
    """CP VJP with tensorly: one MTTKRP (``unfolding_dot_khatri_rao``) per mode."""
    grads = [tl.tenalg.unfolding_dot_khatri_rao(cot, (weights, factors), m)
             for m in range(len(factors))]
    weights_grad = np.sum(grads[0] * factors[0], axis=0) / weights
    return weights_grad, grads


def kron_vjp_reference_builder(splits: list[np.ndarray], cot: np.ndarray) -> Callable[[], list]:
    """One einsum per split on the cotangent viewed mode-major as (m, k) digits."""
    n_splits, order = len(splits), splits[0].ndim
    letters = string.ascii_letters
    axis = {(m, k): letters[m * n_splits + k] for m in range(order) for k in range(n_splits)}
    full = "".join(axis[m, k] for m in range(order) for k in range(n_splits))
    view = cot.reshape(tuple(s for m in range(order) for s in (t.shape[m] for t in splits)))
    plans = []
    for k in range(n_splits):
        others = [j for j in range(n_splits) if j != k]
        expr = ",".join([full] + ["".join(axis[m, j] for m in range(order)) for j in others])
        expr += "->" + "".join(axis[m, k] for m in range(order))
        operands = [view] + [splits[j] for j in others]
        path = np.einsum_path(expr, *operands, optimize="optimal")[0]
        plans.append((expr, operands, path))

    def run() -> list:
        return [np.einsum(expr, *ops, optimize=path) for expr, ops, path in plans]

    return run


# --------------------------------------------------------------------------------------------
# Checking and timing


def _host(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def _flatten(result: Any) -> list[Any]:
    if isinstance(result, (list, tuple)):
        out = []
        for item in result:
            out += _flatten(item)
        return out
    return [result]


def compare(result: Any, reference: Any) -> float:
    """Largest error over all arrays, relative to each reference array's max magnitude.

    Raises ``AssertionError`` when an array fails ``allclose(rtol=1e-4, atol=1e-5·max|ref|)``.
    """
    got, want = _flatten(result), _flatten(reference)
    assert len(got) == len(want), f"{len(got)} arrays returned, {len(want)} expected"
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g64, w64 = np.asarray(_host(g), np.float64), np.asarray(_host(w), np.float64)
        assert g64.shape == w64.shape, f"shape {g64.shape} != {w64.shape}"
        scale = float(np.max(np.abs(w64))) or 1.0
        worst = max(worst, float(np.max(np.abs(g64 - w64))) / scale)
        assert np.allclose(g64, w64, rtol=RTOL, atol=1e-5 * scale), f"rel. error {worst:.2e}"
    return worst


def timed(fn: Callable[[], Any], reference: Any, settings: dict[str, float]) -> dict[str, Any]:
    """Check ``fn()`` against ``reference`` (when given), then time it."""
    rec: dict[str, Any] = {}
    try:
        if reference is not None:
            rec["max_rel_err"] = compare(fn(), reference)
        rec.update(best_time(fn, **settings))
        rec["status"] = "ok"
    except AssertionError as exc:
        rec["status"] = f"MISMATCH: {exc}"
    except Exception as exc:
        rec["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return rec


def timed_rounds(
    methods: dict[str, tuple[Callable[[], Any], Any]], settings: dict[str, float], rounds: int
) -> dict[str, dict[str, Any]]:
    """Time every method in ``rounds`` interleaved rounds, best over rounds.

    ``methods`` maps a label to ``(fn, reference)``; each result is checked against its
    reference in the first round only.  Each round gets ``1/rounds`` of the time budget (and at
    least ``min_reps`` calls), so ours and the reference share the machine's slow and fast phases
    instead of one of them getting a slow phase alone.
    """
    per_round = {**settings, "min_time": settings["min_time"] / rounds,
                 "max_time": settings["max_time"] / rounds}
    out: dict[str, dict[str, Any]] = {}
    for i in range(rounds):
        for label, (fn, reference) in methods.items():
            prev = out.get(label)
            if prev is not None and prev["status"] != "ok":
                continue
            rec = timed(fn, reference if i == 0 else None, per_round)
            if prev is None or rec["status"] != "ok":
                out[label] = rec
                continue
            merge_round(prev, rec)
    return out


# --------------------------------------------------------------------------------------------
# Cases


def _torch(arrays: Any) -> Any:
    import torch

    if isinstance(arrays, list):
        return [torch.from_numpy(a.copy()) for a in arrays]
    return torch.from_numpy(arrays.copy())


def run_tucker(order: int, side: int, rng: np.random.Generator, settings, use_torch: bool,
               rounds: int):
    core = rng.standard_normal((TUCKER_RANK,) * order, dtype=np.float32)
    factors = [rng.standard_normal((side, TUCKER_RANK), dtype=np.float32) for _ in range(order)]
    cot = rng.standard_normal((side,) * order, dtype=np.float32)
    ref = tl.tucker_to_tensor((core, factors))
    ref_vjp = tucker_vjp_reference(core, factors, cot)
    forward = {
        "ours": (lambda: tucker_to_tensor(core, factors), ref),
        "tensorly": (lambda: tl.tucker_to_tensor((core, factors)), None),
    }
    backward = {
        "vjp ours": (lambda: tucker_vjp(core, factors, cot), ref_vjp),
        "vjp reference": (lambda: tucker_vjp_reference(core, factors, cot), None),
        "core-grad reference": (lambda: tucker_core_grad_reference(factors, cot), None),
    }
    if use_torch:
        tcore, tfac, tcot = _torch(core), _torch(factors), _torch(cot)
        forward["ours torch"] = (lambda: tucker_to_tensor(tcore, tfac), ref)
        backward["vjp ours torch"] = (lambda: tucker_vjp(tcore, tfac, tcot), ref_vjp)
    return {**timed_rounds(forward, settings, rounds), **timed_rounds(backward, settings, rounds)}


def run_cp(order: int, side: int, rng: np.random.Generator, settings, use_torch: bool,
           rounds: int):
    weights = rng.uniform(0.5, 1.5, CP_RANK).astype(np.float32)
    factors = [rng.standard_normal((side, CP_RANK), dtype=np.float32) for _ in range(order)]
    cot = rng.standard_normal((side,) * order, dtype=np.float32)
    ref = tl.cp_to_tensor((weights, factors))
    ref_vjp = cp_vjp_reference(weights, factors, cot)
    forward = {
        "ours": (lambda: cp_to_tensor(weights, factors), ref),
        "tensorly": (lambda: tl.cp_to_tensor((weights, factors)), None),
    }
    backward = {
        "vjp ours": (lambda: cp_vjp(weights, factors, cot), ref_vjp),
        "vjp reference": (lambda: cp_vjp_reference(weights, factors, cot), None),
    }
    if use_torch:
        tw, tfac, tcot = _torch(weights), _torch(factors), _torch(cot)
        forward["ours torch"] = (lambda: cp_to_tensor(tw, tfac), ref)
        backward["vjp ours torch"] = (lambda: cp_vjp(tw, tfac, tcot), ref_vjp)
    return {**timed_rounds(forward, settings, rounds), **timed_rounds(backward, settings, rounds)}


def run_kron(order: int, n_splits: int, side: int, rng: np.random.Generator, settings,
             use_torch: bool, rounds: int):
    splits = [rng.standard_normal((side,) * order, dtype=np.float32) for _ in range(n_splits)]
    cot = rng.standard_normal((side**n_splits,) * order, dtype=np.float32)
    ref = tl.tenalg.kronecker(splits)
    ref_vjp_fn = kron_vjp_reference_builder(splits, cot)
    ref_vjp = ref_vjp_fn()
    forward = {
        "ours": (lambda: kron(splits), ref),
        "tensorly": (lambda: tl.tenalg.kronecker(splits), None),
    }
    backward = {
        "vjp ours": (lambda: kron_vjp(splits, cot), ref_vjp),
        "vjp reference": (ref_vjp_fn, None),
    }
    if use_torch:
        tsp, tcot = _torch(splits), _torch(cot)
        forward["ours torch"] = (lambda: kron(tsp), ref)
        backward["vjp ours torch"] = (lambda: kron_vjp(tsp, tcot), ref_vjp)
    return {**timed_rounds(forward, settings, rounds), **timed_rounds(backward, settings, rounds)}


# --------------------------------------------------------------------------------------------
# Report


def _t(rec: dict[str, Any] | None) -> float | None:
    return rec.get("best_s") if rec else None


def _ms(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "–"
    if rec["status"] != "ok":
        return rec["status"]
    return fmt_ms(rec["best_s"]) + (" ‡" if disturbed(rec) else "")


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    ta, tb = _t(a), _t(b)
    return ta / tb if ta and tb else None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:g} KiB"


def report(records: list[dict[str, Any]]) -> str:
    out = []
    for kind, title, ref_name in (
        ("tucker", f"Tucker, r = {TUCKER_RANK}", "tensorly ref."),
        ("cp", f"CP, R = {CP_RANK}, with weights", "tensorly ref."),
        ("kron", "Kronecker, K equal splits of side s", "np.einsum ref."),
    ):
        recs = [r for r in records if r["op"] == kind]
        if not recs:
            continue
        target = TARGETS.get(kind)
        head = ["M", "K, s" if kind == "kron" else "d", "output", "ours", "tensorly",
                "ours / tensorly"]
        if target:
            head.append(f"≤ {target}×?")
        head += ["ours torch", "VJP ours", f"VJP {ref_name}", "VJP ours / ref."]
        if kind == "tucker":
            head.append("core-grad only, tensorly")
        head.append("VJP ours torch")
        rows = []
        for r in recs:
            m = r["results"]
            ratio = _ratio(m["ours"], m["tensorly"])
            row = [str(r["M"]), f"{r['K']}, {r['s']}" if kind == "kron" else str(r["d"]),
                   f"{r['d']}^{r['M']} ({_size(r['output_bytes'])})",
                   _ms(m["ours"]), _ms(m["tensorly"]),
                   "–" if ratio is None else f"{ratio:.3f}×"]
            if target:
                row.append("–" if ratio is None else "yes" if ratio <= target else "**no**")
            row += [_ms(m.get("ours torch")), _ms(m["vjp ours"]), _ms(m["vjp reference"]),
                    fmt_ratio(_ratio(m["vjp ours"], m["vjp reference"]))]
            if kind == "tucker":
                row.append(_ms(m["core-grad reference"]))
            row.append(_ms(m.get("vjp ours torch")))
            rows.append(row)
        out.append(f"### {title} (float32, ms)\n")
        out.append(markdown_table(head, rows) + "\n")
        if target:
            ratios = [_ratio(r["results"]["ours"], r["results"]["tensorly"]) for r in recs]
            ratios = [x for x in ratios if x is not None]
            if ratios:
                worst = max(ratios)
                out.append(
                    f"Target ours ≤ {target}× tensorly at every size: "
                    f"{'met' if worst <= target else 'NOT met'} (ratio range "
                    f"{min(ratios):.2f}–{worst:.2f}, {sum(x <= target for x in ratios)}/"
                    f"{len(ratios)} sizes within target)\n"
                )
    if any(disturbed(v) for r in records for v in r["results"].values()):
        out.append(f"‡ other processes used more than {DISTURBED:.0%} of a CPU during this "
                   "measurement (busy time in /proc/stat minus this process's own CPU time)\n")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and outputs up to 16 MiB only (smoke run)")
    parser.add_argument("--ops", default="tucker,cp,kron",
                        help="comma-separated subset of tucker,cp,kron (default: all)")
    parser.add_argument("--max-mib", type=float, default=None,
                        help="skip outputs larger than this (default 128; quick 16)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch-namespace timings")
    add_timing_arguments(parser)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "reconstruct.json",
                        help="output JSON path (default benchmarks/results/reconstruct.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = timing_settings(args)
    max_bytes = (args.max_mib if args.max_mib is not None else 16 if args.quick else 128) * 2**20
    ops = {o.strip() for o in args.ops.split(",")}
    unknown = ops - {"tucker", "cp", "kron"}
    if unknown:
        raise SystemExit(f"unknown ops {sorted(unknown)} (use tucker, cp, kron)")
    use_torch = not args.no_torch
    if use_torch:
        import torch  # noqa: F401 - fail early when torch is missing
    tl.set_backend("numpy")

    machine = machine_info()
    print(f"# Reconstruction benchmark  ({machine['date']}, {machine['cpu_model']}, "
          f"{machine['usable_cpus']} CPUs, numpy {machine['numpy']}, torch {machine['torch']}, "
          f"tensorly {machine['tensorly']}, tensoradapt {tensoradapt.__version__})", flush=True)
    git = machine["git"]
    print(f"tensoradapt checkout: commit {git.get('commit', '?')[:12]}"
          + (f", uncommitted library changes: {git['library_changes_not_committed']}"
             if git.get("library_changes_not_committed") else ""), flush=True)
    print(f"timing: {settings}", flush=True)
    rng = np.random.default_rng(args.seed)
    cases: list[tuple[str, int, int, int, int]] = []  # (op, M, d, K, s)
    for op in ("tucker", "cp"):
        if op in ops:
            cases += [(op, m, d, 1, d) for m in ORDERS for d in SIDES]
    if "kron" in ops:
        cases += [("kron", m, s**k, k, s) for m, k, s in KRON_CASES]
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    start, load = time.perf_counter(), ForeignLoad()
    for op, order, side, n_splits, split_side in cases:
        nbytes = side**order * 4
        label = f"{op} M={order} d={side}"
        if op == "kron":
            label += f" K={n_splits} s={split_side}"
        if nbytes > max_bytes:
            skipped.append(f"{label} ({_size(nbytes)})")
            continue
        t0 = time.perf_counter()
        if op == "tucker":
            results = run_tucker(order, side, rng, settings, use_torch, args.rounds)
        elif op == "cp":
            results = run_cp(order, side, rng, settings, use_torch, args.rounds)
        else:
            results = run_kron(order, n_splits, split_side, rng, settings, use_torch,
                               args.rounds)
        records.append({"op": op, "M": order, "d": side, "K": n_splits, "s": split_side,
                        "shape": [side] * order, "output_bytes": nbytes, "results": results})
        bad = [f"{k}: {v['status']}" for k, v in results.items() if v["status"] != "ok"]
        bad += [f"{k}: disturbed" for k, v in results.items() if disturbed(v)]
        print(f"  {label:28s} {time.perf_counter() - t0:5.1f} s"
              + (f"  [{'; '.join(bad)}]" if bad else ""), file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - start
    end = end_run(load, machine)
    print()
    print(report(records))
    if skipped:
        print(f"skipped (output over {_size(int(max_bytes))}): {', '.join(skipped)}\n")
    print(disturbance_line(elapsed, end, machine))
    write_json(args.json, {
        "benchmark": "reconstruct",
        "command": command_line(argv),
        "machine": machine,
        "settings": {**settings, "rtol": RTOL, "atol": "1e-5 * max|ref|", "seed": args.seed,
                     "rounds": args.rounds, "tucker_rank": TUCKER_RANK, "cp_rank": CP_RANK,
                     "dtype": "float32",
                     "max_output_bytes": max_bytes, "targets_ours_over_tensorly": TARGETS},
        "skipped": skipped,
        "elapsed_s": elapsed,
        **end,
        "results": records,
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
