"""One-GPU check of tensoradapt (issue 20): FWHT, train steps against PEFT LoRA, ΔW generation memory.

Writes one JSON file with the machine, the card, the torch/CUDA versions, the date and every figure:

* ``fwht``: ``tensoradapt.ops.fwht`` and ``tensoradapt.torch.functional.fwht`` on CUDA tensors (and
  ``ops.fwht`` on CuPy arrays when CuPy works) against a device-to-device copy of the same bytes,
  and against fast CUDA Walsh–Hadamard kernels when one is importable (``fast_hadamard_transform``,
  ``pyfwht.gpu``, ``hadamard_transform``; otherwise recorded as not installed) and a dense
  ``x @ H`` GEMM at small ``n``.  Every result is checked against a float64 radix-2 reference.
* ``train_gpt2`` / ``train_llama``: one training step (forward, LM loss, backward, ``AdamW.step``)
  of a GPT-2 (6 layers × 512, ``c_attn``) and of a Llama-shaped model (hidden 1024, intermediate
  2816, 8 layers, all seven linear projections), both built from transformers configs (nothing is
  downloaded), for tensoradapt LoRA r=8, LoRTA (``presets.lorta(3, 32, groups=1)``), LoKr
  (``presets.lokr(8)``) and Fastfood ρ=0.1 on that LoRTA, against PEFT LoRA r=8 on the same device:
  median step time (``torch.cuda.synchronize`` around each step, configurations interleaved over
  rounds) and peak extra memory (``torch.cuda.max_memory_allocated``, reset just before
  attaching, minus what was allocated then: the model and the batch), each also as a ratio to
  PEFT's.
* ``deltas``: ``ΔW`` generation peak memory and time of ``adapter.deltas()`` on the Llama-shaped
  model, and of the core generator (``SuperLoRA.delta`` / ``vjp``, Fastfood ρ=0.01, generator 2)
  on 32 × 4096² with CUDA tensors.

Robustness: every measurement is an *item* run under a soft timeout; a failing item is recorded
(``status: error`` with the exception) and the run goes on.  A global time budget (``--budget``
seconds) is shared among the sections; an item that no longer fits is recorded as ``skipped``
with the reason.  On CUDA each section runs in its own subprocess (a CUDA error cannot poison the
next section, and a hung section is killed at its hard timeout); results are written after every
item, so an interrupted run still leaves its JSON.

Usage (from the repository root)::

    python benchmarks/gpu_check.py --out gpu_check.json            # CUDA, full sizes, budget 400 s
    python benchmarks/gpu_check.py --device cpu --smoke --out x.json  # tiny sizes, seconds (tests)

``benchmarks/gpu_check.sh`` is the prepared entry point on a GPU machine: it also installs what is
missing and runs the ``gpu`` tests, then this script.  It calls the helper sub-commands
``ensure-deps``, ``record-step`` and ``merge-steps`` (see ``--help`` of each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fnmatch
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "tensoradapt.gpu_check/1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
SECTIONS = ("fwht", "train_gpt2", "train_llama", "deltas")
# Share of the remaining budget each section gets when it starts (unused time rolls over).
SHARES = {"fwht": 0.2, "train_gpt2": 0.25, "train_llama": 0.35, "deltas": 0.2}
MIN_ITEM_S = 1.0  # an item is not started with less than this left (plus its own estimate)
SECTION_GRACE_S = 20.0  # hard timeout of a section subprocess beyond its budget
PEFT = "peft lora r=8"
STATUSES = ("ok", "error", "timeout", "skipped")


# ----------------------------------------------------------------------------------------------
# Budget, items and soft timeouts


class StepTimeout(Exception):
    """Raised inside an item when its soft timeout expires."""


class InjectedFailure(RuntimeError):
    """Raised by an item named with ``--fail`` (tests of the error recording)."""


class Budget:
    """A wall-clock deadline shared by the items of a run (``clock`` injectable for tests)."""

    def __init__(self, seconds: float | None = None, *, deadline: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        start = clock()
        self.deadline = deadline if deadline is not None else start + float(seconds or 0.0)
        self.total = self.deadline - start

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - self.clock())


@contextlib.contextmanager
def soft_timeout(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in the block after ``seconds`` (SIGALRM; main thread only).

    Nests: an enclosing soft timeout that expires first still fires (the inner one is cut to it,
    and it is re-armed with what is left on exit).  A call blocked inside C code (a CUDA
    synchronisation, say) is interrupted when it returns to Python; the section subprocess's hard
    timeout covers calls that never return."""
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and seconds > 0 and math.isfinite(seconds))
    if not usable:
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise StepTimeout(f"soft timeout after {seconds:.1f} s")

    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]
    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left > 0 else seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:  # re-arm the enclosing timeout with what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - start)))


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " …"


@dataclass
class Runner:
    """Runs named items under the budget, recording each in ``items`` (never raises).

    Each record has ``status`` (one of :data:`STATUSES`) and ``seconds``; ``ok`` records carry the
    item's ``result``, ``error``/``timeout`` ones the ``error`` text (and a traceback tail), and
    ``skipped`` ones the ``reason``."""

    budget: Budget
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail: Sequence[str] = ()
    on_record: Callable[[], None] | None = None
    cleanup: Callable[[], None] | None = None

    def skip(self, name: str, reason: str) -> None:
        """Record ``name`` as skipped with ``reason``."""
        self.record(name, {"status": "skipped", "seconds": 0.0, "reason": reason})

    def run(self, name: str, fn: Callable[[], Any], *, timeout: float = 120.0, need: float = 0.0,
            describe: Callable[[Any], Any] | None = None) -> Any:
        """Run ``fn()`` as item ``name``; return its result, or ``None`` if it failed or was skipped.

        ``need`` is the item's own estimate of seconds: it is skipped, with the reason recorded,
        unless ``need + MIN_ITEM_S`` seconds are left.  ``timeout`` caps its run time (and so does
        the budget left).  The recorded ``result`` is ``describe(result)`` when given (for results
        that are objects, not figures)."""
        left = self.budget.remaining()
        if left < need + MIN_ITEM_S:
            self.skip(name, f"time budget: {left:.1f} s left of {self.budget.total:.0f} s, "
                            f"item needs about {need + MIN_ITEM_S:.0f} s")
            return None
        start = time.perf_counter()
        record: dict[str, Any]
        result = None
        try:
            with soft_timeout(min(timeout, left)):
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.fail):
                    raise InjectedFailure(f"injected failure of {name!r} (--fail)")
                result = fn()
            record = {"status": "ok", "result": describe(result) if describe is not None else result}
        except StepTimeout as exc:
            record = {"status": "timeout", "error": _error_text(exc)}
        except Exception as exc:
            record = {"status": "error", "error": _error_text(exc),
                      "traceback": "".join(traceback.format_exception(exc)[-6:])[-3000:]}
        record["seconds"] = round(time.perf_counter() - start, 4)
        if record["status"] != "ok" and self.cleanup is not None:
            with contextlib.suppress(Exception):
                self.cleanup()
        self.record(name, record)
        return result if record["status"] == "ok" else None

    def record(self, name: str, record: dict[str, Any]) -> None:
        """Store ``record`` as item ``name`` (and save, if a callback is set)."""
        self.items[name] = record
        if self.on_record is not None:
            self.on_record()


# ----------------------------------------------------------------------------------------------
# Device helpers


@dataclass
class Context:
    """What a section needs: the device, the sizes (smoke or full) and the item runner."""

    device: str
    smoke: bool
    runner: Runner

    @property
    def cuda(self) -> bool:
        """Whether the device is a CUDA device."""
        return self.device.startswith("cuda")

    def sync(self) -> None:
        """Wait for the device (a no-op on the CPU)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def cleanup(self) -> None:
        """Free device memory that can be freed: garbage cycles, then the CUDA caching allocator's
        unused blocks (a no-op on the CPU, where no memory is measured)."""
        if self.cuda:
            import torch

            gc.collect()
            torch.cuda.empty_cache()

    @staticmethod
    def freeze() -> None:
        """Move every object alive now out of the garbage collector's sight (``gc.freeze``): with
        torch and transformers loaded, each full collection otherwise takes about 0.5 s."""
        gc.collect()
        gc.freeze()

    def reset_peak(self) -> int | None:
        """Reset the peak-memory counter; return the bytes allocated now (``None`` on the CPU)."""
        if not self.cuda:
            return None
        import torch

        self.sync()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())

    def peak(self) -> int | None:
        """Peak bytes allocated since the last :meth:`reset_peak` (``None`` on the CPU)."""
        if not self.cuda:
            return None
        import torch

        self.sync()
        return int(torch.cuda.max_memory_allocated())


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cupy_dist() -> str | None:
    try:
        dists = importlib.metadata.distributions()
        found = sorted(f"{d.metadata['Name']} {d.version}" for d in dists
                       if (d.metadata["Name"] or "").lower().startswith("cupy"))
    except Exception:
        return None
    return ", ".join(found) or None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _run_text(cmd: list[str], timeout: float = 10.0) -> str:
    """stdout of ``cmd`` (else its stderr, or the reason it could not run), at most 2000 characters."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return (out.stdout.rstrip() or out.stderr.strip())[-2000:]


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether the library sources differ from it."""
    commit = _run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).strip()
    changes = _run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--", "tensoradapt", "bindings"])
    return {"commit": commit, "library_changes_not_committed": changes.splitlines()[:50]}


def environment(device: str) -> dict[str, Any]:
    """Machine, card, versions and date (never raises: a failed probe is recorded as text)."""
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read("/proc/meminfo"), re.M)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "executable": sys.executable,
            "cpu_model": model.group(1).strip() if model else platform.processor(),
            "logical_cpus": os.cpu_count(),
            "mem_total_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        },
        "versions": {
            "tensoradapt": _dist_version("tensoradapt"), "numpy": _dist_version("numpy"),
            "scipy": _dist_version("scipy"), "torch": _dist_version("torch"),
            "transformers": _dist_version("transformers"), "peft": _dist_version("peft"),
            "array-api-compat": _dist_version("array-api-compat"),
            "array-api-strict": _dist_version("array-api-strict"), "tensorly": _dist_version("tensorly"),
            "triton": _dist_version("triton"), "cupy": _cupy_dist(),
            "fast-hadamard-transform": _dist_version("fast-hadamard-transform", "fast_hadamard_transform"),
            "pyfwht": _dist_version("pyfwht"), "hadamard-transform": _dist_version("hadamard-transform"),
        },
        "card": None,
        "torch": {},
        "nvidia_smi": None,
        "git": git_commit(),
    }
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                        "clocks.max.sm,power.limit", "--format=csv,noheader"])
    try:
        import torch

        tinfo: dict[str, Any] = {
            "version": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "threads": torch.get_num_threads(),
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        }
        if device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.device(device))
            tinfo.update({
                "device_name": props.name, "capability": f"{props.major}.{props.minor}",
                "total_memory_gib": round(props.total_memory / 2**30, 2),
                "multiprocessors": props.multi_processor_count,
                "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            })
            info["card"] = props.name
        info["torch"] = tinfo
    except Exception as exc:
        info["torch"] = {"error": _error_text(exc)}
    return info


# ----------------------------------------------------------------------------------------------
# Timing


def time_interleaved(fns: dict[str, Callable[[], Any]], sync: Callable[[], None], *, rounds: int, reps: int,
                     target_s: float) -> dict[str, dict[str, Any]]:
    """Median seconds per call of each function, the functions interleaved over ``rounds``.

    Each sample times ``k`` back-to-back calls between two synchronisations and divides by ``k``
    (``k`` calibrated once so that a sample lasts about ``target_s``: small device calls are
    launch-bound, and one synchronisation per call would measure the host round trip).  After one
    warm-up call each.  Rounds alternate the order of the functions."""
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, min(1000, int(target_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, k = fns[name], calls[name]
            for _ in range(reps):
                sync()
                start = time.perf_counter()
                for _ in range(k):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) / k)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "samples": len(s),
                   "calls_per_sample": calls[name]} for name, s in samples.items()}


# ----------------------------------------------------------------------------------------------
# Section: FWHT


def fwht_reference(x: Any) -> Any:
    """Unnormalised Walsh–Hadamard transform of the last axis in float64 (radix-2, torch)."""
    import torch

    n = x.shape[-1]
    y = x.double().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
        h *= 2
    return y.reshape(x.shape)


def relative_error(y: Any, ref: Any) -> tuple[float, str]:
    """``‖y/s − ref‖ / ‖ref‖`` for the normalisation ``s`` (1, 1/√n, 1/n) that fits best."""
    n = ref.shape[-1]
    y64 = y.double()
    norm = float(ref.norm()) or 1.0
    best = (math.inf, "unnormalised")
    for label, scale in (("unnormalised", 1.0), ("1/sqrt(n)", n ** -0.5), ("1/n", 1.0 / n)):
        err = float((y64 / scale - ref).norm()) / norm
        best = min(best, (err, label))
    return best


def fwht_baselines() -> dict[str, str]:
    """Which optional FWHT packages import (``"ok"``) or why not (``"not installed: ..."``)."""
    found: dict[str, str] = {}
    for name in ("fast_hadamard_transform", "pyfwht", "hadamard_transform", "cupy"):
        try:
            module = importlib.import_module(name)
            note = "ok"
            if name == "pyfwht":
                gpu = getattr(module, "gpu", None)
                note = "ok" if gpu is not None and getattr(gpu, "available", False) else "ok (no CUDA backend)"
            if name == "cupy":
                note = "ok" if module.cuda.runtime.getDeviceCount() > 0 else "ok (no CUDA device)"
            found[name] = note
        except Exception as exc:
            found[name] = f"not installed: {_error_text(exc)}"
    return found


FAST_HADAMARD_MAX_N = 32768  # fast_hadamard_transform's largest dimension


def fwht_methods(ctx: Context, x: Any, available: dict[str, str]) -> dict[str, Callable[[], Any]]:
    """``{method: call}`` on the input ``x`` (a float32 ``(B, n)`` torch tensor on the device).

    ``copy`` is the floor (a device copy of the same bytes into a preallocated tensor); the
    others compute ``H_n x`` up to a normalisation (each is checked before it is timed)."""
    import torch

    import tensoradapt.torch.functional as F
    from tensoradapt import ops

    out = torch.empty_like(x)
    methods: dict[str, Callable[[], Any]] = {
        "copy": lambda: out.copy_(x),
        "ours ops.fwht (torch)": lambda: ops.fwht(x),
        "ours functional.fwht (torch)": lambda: F.fwht(x),
    }
    n = x.shape[-1]
    if ctx.cuda and available.get("cupy") == "ok":
        import cupy

        xc = cupy.from_dlpack(x)
        methods["ours ops.fwht (cupy)"] = lambda: ops.fwht(xc)
    if ctx.cuda and available.get("fast_hadamard_transform") == "ok" and n <= FAST_HADAMARD_MAX_N:
        from fast_hadamard_transform import hadamard_transform as dao

        methods["fast_hadamard_transform"] = lambda: dao(x, 1.0)
    if ctx.cuda and available.get("pyfwht") == "ok":
        import pyfwht

        buf = torch.empty_like(x)

        def _pyfwht() -> Any:  # in place: refill, then transform (the refill copy is included)
            buf.copy_(x)
            pyfwht.gpu.batch_transform_dlpack(buf)
            return buf

        methods["pyfwht.gpu (in place, + refill copy)"] = _pyfwht
    if available.get("hadamard_transform") == "ok":
        from hadamard_transform import hadamard_transform as ht

        methods["hadamard_transform (torch ops)"] = lambda: ht(x)
    if n <= (1 << 13):
        from scipy.linalg import hadamard

        h = torch.from_numpy(hadamard(n).astype("float32")).to(x.device)
        methods["dense x @ H"] = lambda: x @ h
    return methods


def _as_torch(y: Any) -> Any:
    import torch

    if isinstance(y, torch.Tensor):
        return y
    return torch.from_dlpack(y)


def fwht_sizes(smoke: bool) -> list[tuple[int, int]]:
    """``(batch, n)`` of the FWHT measurements: 4 MiB (L2-resident on an H100), 256 MiB, a batch
    that fast_hadamard_transform supports (n ≤ 2^15), and one 64 MiB row."""
    if smoke:
        return [(1, 1 << 10), (8, 1 << 8)]
    return [(1, 1 << 20), (64, 1 << 20), (4096, 1 << 14), (1, 1 << 24)]


def section_fwht(ctx: Context) -> None:
    """FWHT against the copy of the same bytes and against the baselines, at several sizes."""
    import torch

    rounds, reps, target = (1, 2, 0.0) if ctx.smoke else (3, 5, 0.002)
    runner = ctx.runner
    available = runner.run("fwht/baselines", fwht_baselines, timeout=60) or {}
    for b, n in fwht_sizes(ctx.smoke):
        tag = f"fwht/b={b},n=2^{n.bit_length() - 1}"

        def make(b: int = b, n: int = n) -> tuple[Any, Any]:
            gen = torch.Generator(device="cpu").manual_seed(b * n)
            x = torch.randn(b, n, generator=gen, dtype=torch.float32).to(ctx.device)
            return x, fwht_reference(x)

        made = runner.run(f"{tag}/input", make, timeout=60, need=1, describe=lambda _: None)
        if made is None:
            continue
        x, ref = made
        methods = runner.run(f"{tag}/methods", lambda x=x: fwht_methods(ctx, x, available), timeout=60,
                             describe=list) or {}
        working: dict[str, Callable[[], Any]] = {}
        checks: dict[str, dict[str, Any]] = {}
        for name, call in methods.items():
            if name == "copy":
                working[name] = call
                continue

            def check(call: Callable[[], Any] = call, ref: Any = ref) -> dict[str, Any]:
                y = _as_torch(call())
                ctx.sync()
                err, normalisation = relative_error(y, ref)
                if not err < 1e-4:
                    raise AssertionError(f"relative error {err:.3g} against the float64 reference")
                return {"rel_err": err, "normalisation": normalisation}

            got = runner.run(f"{tag}/check/{name}", check, timeout=60, need=1)
            if got is not None:
                checks[name] = got
                working[name] = call
        if available.get("fast_hadamard_transform") == "ok" and n > FAST_HADAMARD_MAX_N:
            runner.skip(f"{tag}/check/fast_hadamard_transform", f"n > {FAST_HADAMARD_MAX_N} is not supported by it")

        def measure(working: dict[str, Callable[[], Any]] = working, checks: dict[str, Any] = checks,
                    b: int = b, n: int = n) -> dict[str, Any]:
            times = time_interleaved(working, ctx.sync, rounds=rounds, reps=reps, target_s=target)
            copy_s = times["copy"]["median_s"]
            ours_s = times.get("ours ops.fwht (torch)", {}).get("median_s")
            rows = {}
            for name, t in times.items():
                row = {**t, **checks.get(name, {}), "vs_copy": t["median_s"] / copy_s}
                if ours_s is not None and not name.startswith("ours") and name != "copy":
                    row["ours_speedup"] = t["median_s"] / ours_s  # > 1: ours is faster
                rows[name] = row
            nbytes = b * n * 4
            return {"batch": b, "n": n, "bytes": nbytes, "methods": rows,
                    "copy_gbps_read_plus_write": 2 * nbytes / copy_s / 1e9}

        runner.run(tag, measure, timeout=120, need=2)
        del x, ref, made, methods, working
        ctx.cleanup()


# ----------------------------------------------------------------------------------------------
# Sections: training steps


def model_spec(kind: str, smoke: bool) -> dict[str, Any]:
    """The model's config, batch and targets (full or smoke size).

    The full sizes are those of the CPU benchmarks, so that the ratios compare:
    ``bench_torch_peft.py`` (GPT-2, batch 8 × 128) and ``bench_llm_step.py`` (Llama-shaped,
    vocabulary 4096, batch 2 × 128)."""
    if kind == "gpt2":
        config = ({"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 128, "n_positions": 16} if smoke
                  else {"n_layer": 6, "n_embd": 512, "n_head": 8, "vocab_size": 8192, "n_positions": 128})
        return {"kind": kind, "config": config, "batch": (2, 16) if smoke else (8, 128), "targets": ["c_attn"]}
    if kind == "llama":
        config = ({"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "vocab_size": 128, "max_position_embeddings": 32} if smoke
                  else {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 4096,
                        "max_position_embeddings": 128})
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return {"kind": kind, "config": {**config, "tie_word_embeddings": False},
                "batch": (2, 16) if smoke else (2, 128), "targets": targets}
    raise ValueError(f"unknown model kind {kind!r}")


def build_model(spec: dict[str, Any]) -> Any:
    """The model of ``spec`` on the CPU, seeded, dropout off (nothing is downloaded)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if spec["kind"] == "gpt2":
        config = transformers.GPT2Config(**spec["config"], bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(**spec["config"], bos_token_id=0, eos_token_id=0, attention_dropout=0.0)
    return transformers.LlamaForCausalLM(config)


def _describe_model(model: Any) -> dict[str, Any]:
    return {"class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}


def adapter_configs() -> dict[str, Any]:
    """tensoradapt's configurations measured against PEFT LoRA r=8."""
    from tensoradapt import presets

    lorta = presets.lorta(3, 32, groups=1)
    return {
        "ours lora r=8": presets.lora(8, alpha=16),
        "ours lorta M=3 r=32 G=1": lorta,
        "ours lokr r=8": presets.lokr(8),
        "ours fastfood rho=0.1 lorta M=3 r=32 G=1": presets.with_projection(lorta, "fastfood", 0.1),
    }


def attach(model: Any, name: str, spec: dict[str, Any]) -> tuple[Any, list[Any], Any]:
    """Attach PEFT LoRA (``name == PEFT``) or tensoradapt's ``name``: ``(model, trainable, adapter)``."""
    if name == PEFT:
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(spec["targets"]), lora_dropout=0.0,
                                 fan_in_fan_out=spec["kind"] == "gpt2", bias="none")
        model = peft.get_peft_model(model, config)
        return model, [p for p in model.parameters() if p.requires_grad], None
    import tensoradapt.torch as tat

    adapter = tat.attach(model, adapter_configs()[name], list(spec["targets"]))
    return model, list(adapter.trainable_parameters()), adapter


def train_run(ctx: Context, base: Any, spec: dict[str, Any], name: str, steps: int, warmup: int) -> dict[str, Any]:
    """One configuration's training steps on a fresh copy of ``base``: times and peak memory.

    ``peak_extra_bytes`` is the peak allocated during attach and the steps minus what was allocated
    just before attaching (the base model, this run's copy of it and the batch): activations, the
    adapter's tensors, gradients, optimiser states and caches."""
    import torch

    model = copy.deepcopy(base).to(ctx.device)
    batch, tokens = spec["batch"]
    vocab = spec["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    ctx.cleanup()
    before = ctx.reset_peak()
    model, params, adapter = attach(model, name, spec)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times: list[float] = []
    losses: list[float] = []
    for i in range(warmup + steps):
        ctx.sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctx.sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = ctx.peak()
    result = {
        "kind": spec["kind"], "config": name, "trainable": sum(p.numel() for p in params),
        "median_s": statistics.median(times), "times_s": times, "allocated_before_bytes": before,
        "peak_extra_bytes": None if peak is None or before is None else peak - before,
        "loss_first": losses[0], "loss_last": losses[-1],
        "losses_finite": all(math.isfinite(v) for v in losses),
    }
    del model, params, adapter, opt, ids, loss
    ctx.cleanup()
    if not result["losses_finite"]:
        raise FloatingPointError(f"non-finite loss: {losses}")
    return result


def section_train(ctx: Context, kind: str) -> None:
    """PEFT LoRA and tensoradapt's configurations, interleaved over rounds, on one model."""
    spec = model_spec(kind, ctx.smoke)
    rounds, steps, warmup = (2, 2, 1) if ctx.smoke else (3, 10, 3)
    runner = ctx.runner
    base = runner.run(f"train/{kind}/build", lambda: build_model(spec).to(ctx.device), timeout=120,
                      describe=_describe_model)
    if base is None:
        return
    ctx.freeze()
    names = [PEFT, *adapter_configs()]
    run_s: dict[str, float] = {}  # each configuration's last run time, the estimate of the next
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            item = f"train/{kind}/{name}/round{r}"
            started = time.perf_counter()
            runner.run(item, lambda name=name: train_run(ctx, base, spec, name, steps, warmup),
                       timeout=180, need=run_s.get(name, 0.0))
            run_s[name] = time.perf_counter() - started
    configs = {k: repr(v) for k, v in adapter_configs().items()}
    runner.record(f"train/{kind}/spec", {"status": "ok", "seconds": 0.0, "result": {
        **spec, "rounds": rounds, "steps": steps, "warmup": warmup, "dtype": "float32",
        "step": "forward + LM loss + backward + AdamW.step", "configs": configs}})


# ----------------------------------------------------------------------------------------------
# Section: ΔW generation memory


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def section_deltas(ctx: Context) -> None:
    """Peak memory and time of ``adapter.deltas()`` (Llama-shaped) and of the core generator."""
    import torch

    runner = ctx.runner
    spec = model_spec("llama", ctx.smoke)
    base = runner.run("deltas/llama/build", lambda: build_model(spec).to(ctx.device), timeout=120,
                      describe=_describe_model)
    ctx.freeze()
    reps = 1 if ctx.smoke else 3

    def measure(make: Callable[[], Any], produce: Callable[[Any], Any], inputs_bytes: int = 0) -> dict[str, Any]:
        """Peak (beyond what existed before) and median time of ``produce(state)``."""
        state = make()
        ctx.cleanup()
        before = ctx.reset_peak()
        out = produce(state)
        ctx.sync()
        peak = ctx.peak()
        tensors = list(out.values()) if isinstance(out, dict) else list(out)
        output_bytes = _nbytes(tensors)
        del out, tensors
        times = []
        for _ in range(reps):
            ctx.sync()
            start = time.perf_counter()
            again = produce(state)
            ctx.sync()
            times.append(time.perf_counter() - start)
            del again
        extra = None if peak is None or before is None else peak - before
        del state
        ctx.cleanup()
        return {"output_bytes": output_bytes, "peak_extra_bytes": extra,
                "peak_over_output": None if extra is None or not output_bytes else extra / output_bytes,
                "median_s": statistics.median(times)}

    if base is not None:
        for name in adapter_configs():
            def make(name: str = name) -> Any:
                _model, params, adapter = attach(copy.deepcopy(base).to(ctx.device), name, spec)
                with torch.no_grad():
                    for p in params:  # non-zero parameters (LoRA's B starts at zero)
                        p.add_(torch.randn_like(p) * 1e-2)
                return adapter

            runner.run(f"deltas/llama/{name}", lambda make=make: measure(make, lambda a: a.deltas()),
                       timeout=120, need=1)
        del base
        ctx.cleanup()

    from tensoradapt import SuperLoRA, presets

    shapes = [(64, 64)] * 4 if ctx.smoke else [(4096, 4096)] * 32
    groups = len(shapes)
    config = presets.with_projection(presets.lorta(3, 8, groups), "fastfood", 0.01)
    label = f"fastfood rho=0.01 lorta M=3 r=8 G={groups}, {len(shapes)}x{shapes[0][0]}x{shapes[0][1]}"

    def make_plan() -> tuple[Any, Any]:
        plan = SuperLoRA(config, shapes)
        return plan, plan.init(0, xp=torch, dtype=torch.float32, device=torch.device(ctx.device), zero=False)

    runner.run(f"deltas/core/{label}/delta", lambda: measure(make_plan, lambda s: s[0].delta(s[1])),
               timeout=180, need=2)

    def make_vjp() -> tuple[Any, Any, Any]:
        plan, params = make_plan()
        gen = torch.Generator(device="cpu").manual_seed(0)
        cots = [torch.randn(s, generator=gen).to(ctx.device) for s in shapes]
        return plan, params, cots

    runner.run(f"deltas/core/{label}/vjp", lambda: measure(make_vjp, lambda s: s[0].vjp(s[1], s[2]).values()),
               timeout=180, need=2)


SECTION_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "fwht": section_fwht,
    "train_gpt2": lambda ctx: section_train(ctx, "gpt2"),
    "train_llama": lambda ctx: section_train(ctx, "llama"),
    "deltas": section_deltas,
}


# ----------------------------------------------------------------------------------------------
# Summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def summarise(items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures from the items: FWHT vs copy, train ratios vs PEFT, ΔW peaks."""
    fwht: dict[str, Any] = {}
    train: dict[str, dict[str, Any]] = {}
    deltas: dict[str, Any] = {}
    for name, rec in items.items():
        res = rec.get("result") if rec.get("status") == "ok" else None
        if not isinstance(res, dict):
            continue
        if name.startswith("fwht/") and "methods" in res:
            fwht[name.removeprefix("fwht/")] = {
                m: {k: row.get(k) for k in ("median_s", "vs_copy", "ours_speedup", "rel_err")}
                for m, row in res["methods"].items()}
        elif name.startswith("train/") and "median_s" in res:
            runs = train.setdefault(res["kind"], {}).setdefault(res["config"], {"medians_s": [], "peaks": []})
            runs["medians_s"].append(res["median_s"])
            runs["trainable"] = res["trainable"]
            if res.get("peak_extra_bytes") is not None:
                runs["peaks"].append(res["peak_extra_bytes"])
        elif name.startswith("deltas/") and "output_bytes" in res:
            deltas[name.removeprefix("deltas/")] = res
    table: dict[str, Any] = {}
    for kind, configs in train.items():
        rows: dict[str, Any] = {}
        base = configs.get(PEFT)
        base_s = min(base["medians_s"]) if base else None
        base_mem = min(base["peaks"]) if base and base["peaks"] else None
        for config, runs in configs.items():
            best = min(runs["medians_s"])
            peak = min(runs["peaks"]) if runs["peaks"] else None
            rows[config] = {"trainable": runs["trainable"], "rounds": len(runs["medians_s"]),
                            "step_s_best_median": best, "step_vs_peft": _ratio(best, base_s),
                            "peak_extra_bytes": peak, "peak_extra_vs_peft": _ratio(peak, base_mem)}
        table[kind] = rows
    return {"fwht": fwht, "train": table, "deltas": deltas}


def count_statuses(items: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many items ended in each status."""
    counts = dict.fromkeys(STATUSES, 0)
    for rec in items.values():
        counts[rec.get("status", "error")] = counts.get(rec.get("status", "error"), 0) + 1
    return counts


def markdown_summary(summary: dict[str, Any]) -> str:
    """A short plain-text table of the summary (printed last, for the run tool's output tail)."""
    lines = []
    for size, methods in summary["fwht"].items():
        for m, row in methods.items():
            speed = row.get("ours_speedup")
            lines.append(f"fwht {size:<16} {m:<40} {row['median_s'] * 1e3:9.4f} ms  {row['vs_copy']:7.2f}x copy"
                         + (f"  ours {speed:.2f}x its speed" if speed else ""))
    for kind, rows in summary["train"].items():
        for config, row in rows.items():
            mem = row["peak_extra_vs_peft"]
            step = row["step_vs_peft"]
            lines.append(f"train {kind:<6} {config:<42} {row['step_s_best_median'] * 1e3:9.2f} ms  "
                         f"step {'-' if step is None else f'{step:.2f}x'} PEFT  "
                         f"peak {'-' if mem is None else f'{mem:.2f}x'} PEFT")
    for name, row in summary["deltas"].items():
        extra = row.get("peak_extra_bytes")
        lines.append(f"deltas {name:<60} out {row['output_bytes'] / 2**20:9.1f} MiB  "
                     f"peak {'-' if extra is None else f'{extra / 2**20:.1f} MiB'}  {row['median_s'] * 1e3:.2f} ms")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Steps recorded by gpu_check.sh


def parse_junit(path: str | Path) -> dict[str, Any]:
    """Counts and the first failing test names of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0) or 0)
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed[:100]}


def read_steps(path: str | Path | None) -> list[dict[str, Any]]:
    """The steps of a JSON-lines file (bad lines are kept as errors), JUnit files summarised."""
    if not path or not Path(path).exists():
        return []
    steps: list[dict[str, Any]] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)
        except json.JSONDecodeError as exc:
            step = {"name": "unparsed", "status": "error", "error": f"{exc}: {line[:500]}"}
        junit = step.get("junit")
        if junit and Path(junit).exists():
            try:
                step["tests"] = parse_junit(junit)
            except Exception as exc:
                step["tests"] = {"error": _error_text(exc)}
        steps.append(step)
    return steps


def record_step(argv: list[str]) -> int:
    """``record-step FILE NAME STATUS RC SECONDS [DETAIL] [--tail-file F] [--junit F] [--result-json F]``."""
    parser = argparse.ArgumentParser(prog="gpu_check.py record-step", description=record_step.__doc__)
    parser.add_argument("file")
    parser.add_argument("name")
    parser.add_argument("status")
    parser.add_argument("rc", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("detail", nargs="?", default="")
    parser.add_argument("--tail-file", default=None, help="keep the last 3000 characters of this file")
    parser.add_argument("--junit", default=None, help="a pytest JUnit XML file of this step")
    parser.add_argument("--result-json", default=None, help="a JSON file whose content becomes 'result'")
    args = parser.parse_args(argv)
    step: dict[str, Any] = {"name": args.name, "status": args.status, "rc": args.rc, "seconds": args.seconds}
    if args.detail:
        step["detail"] = args.detail
    if args.tail_file and Path(args.tail_file).exists():
        step["tail"] = Path(args.tail_file).read_text(errors="replace")[-3000:]
    if args.junit:
        step["junit"] = str(Path(args.junit).resolve())
    if args.result_json and Path(args.result_json).exists():
        try:
            step["result"] = json.loads(Path(args.result_json).read_text())
        except json.JSONDecodeError as exc:
            step["result"] = {"error": _error_text(exc)}
    with open(args.file, "a") as handle:
        handle.write(json.dumps(step) + "\n")
    return 0


def merge_steps(argv: list[str]) -> int:
    """``merge-steps --json OUT --steps FILE [--reason TEXT]``: put the steps into the JSON file.

    Creates a minimal JSON file (with ``reason`` as an error item) when the benchmark run wrote
    none, so that every run of gpu_check.sh leaves one JSON file."""
    parser = argparse.ArgumentParser(prog="gpu_check.py merge-steps", description=merge_steps.__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--reason", default="the benchmark run wrote no JSON")
    args = parser.parse_args(argv)
    path = Path(args.json)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        payload = {"schema": SCHEMA, "command": "merge-steps (no benchmark JSON)",
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "items": {"benchmarks": {"status": "error", "seconds": 0.0,
                                            "error": f"{args.reason} ({_error_text(exc)})"}},
                   "summary": {"fwht": {}, "train": {}, "deltas": {}}}
        payload["counts"] = count_statuses(payload["items"])
    payload["steps"] = read_steps(args.steps)
    write_json(path, payload)
    return 0


# ----------------------------------------------------------------------------------------------
# Dependencies (gpu_check.sh's "deps" step)


def cupy_package(cuda_version: str | None) -> str | None:
    """The CuPy wheel for a CUDA version (``"12.4"`` → ``cupy-cuda12x``); ``None`` if unknown."""
    if not cuda_version:
        return None
    major = cuda_version.split(".")[0]
    return f"cupy-cuda{major}x" if major.isdigit() and int(major) >= 11 else None


# module to import -> pip distribution; the modules tensoradapt or its test suite import.
REQUIRED_MODULES = {"array_api_compat": "array-api-compat", "array_api_strict": "array-api-strict",
                    "tensorly": "tensorly", "hypothesis": "hypothesis", "safetensors": "safetensors",
                    "transformers": "transformers", "peft": "peft"}


_IMPORT_CODE = {"cupy": "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0, 'no CUDA device'"}


def importable(modules: Sequence[str], timeout: float = 120.0) -> dict[str, tuple[bool, str]]:
    """``{module: (imports, last error line)}``, all tried in one fresh interpreter (so that
    installs made meanwhile count, and the check costs one interpreter start)."""
    code = "\n".join([
        "import json, sys, traceback",
        "out = {}",
        f"for m, c in {[(m, _IMPORT_CODE.get(m, f'import {m}')) for m in modules]!r}:",
        "    try:",
        "        exec(c, {})",
        "        out[m] = [True, '']",
        "    except BaseException as e:",
        "        out[m] = [False, f'{type(e).__name__}: {e}'[-500:]]",
        "print('\\nGPU_CHECK_IMPORTS ' + json.dumps(out))",
    ])
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        return dict.fromkeys(modules, (False, f"import check timed out after {timeout:.0f} s"))
    for line in run.stdout.splitlines():
        if line.startswith("GPU_CHECK_IMPORTS "):
            return {m: (bool(ok), detail) for m, (ok, detail) in json.loads(line.split(" ", 1)[1]).items()}
    tail = (run.stderr.strip().splitlines() or ["no output"])[-1][-500:]
    return dict.fromkeys(modules, (False, f"import check failed: {tail}"))


def install_commands(dist: str, wheels: str | None, site: str | None, pip_timeout: int) -> list[list[str]]:
    """The pip commands tried in turn for ``dist``: the carried wheel folder, then the index."""
    target = ["--target", site] if site else []
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
            "--no-cache-dir", *target]
    commands = []
    if wheels and Path(wheels).is_dir():
        commands.append([*base, "--no-index", "--find-links", wheels, dist])
    commands.append([*base, "--timeout", str(pip_timeout), "--retries", "0", dist])
    return commands


def _pip(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run one pip command under ``timeout``: its command line, exit status, seconds, output tail."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        rc, text = out.returncode, (out.stderr or out.stdout).strip()[-800:]
    except subprocess.TimeoutExpired:
        rc, text = 124, f"timed out after {timeout:.0f} s"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - start, 1), "detail": text}


def ensure_deps(argv: list[str]) -> int:
    """``ensure-deps [--wheels DIR] [--site DIR] [--dry-run] [--result FILE]``: make imports work.

    For each module tensoradapt or its tests need, and CuPy for ``torch.version.cuda``: if it does
    not import, ``pip install --no-deps`` it from the wheel folder (if any), then from the index
    (short timeouts: offline this fails in seconds and is recorded).  Then checks that
    ``tensoradapt.torch`` imports, else installs this checkout in editable mode, offline."""
    parser = argparse.ArgumentParser(prog="gpu_check.py ensure-deps", description=ensure_deps.__doc__)
    parser.add_argument("--wheels", default=None, help="a folder of carried wheels")
    parser.add_argument("--site", default=None, help="pip --target folder (must be on PYTHONPATH)")
    parser.add_argument("--pip-timeout", type=int, default=5, help="pip's socket timeout (s)")
    parser.add_argument("--command-timeout", type=float, default=40.0, help="limit of one pip command (s)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; install nothing")
    parser.add_argument("--no-cupy", action="store_true", help="do not try to make CuPy available")
    parser.add_argument("--result", default=None, help="write the outcome as JSON here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    wanted = dict(REQUIRED_MODULES)
    if not args.no_cupy:
        try:
            import torch

            cuda = torch.version.cuda
        except Exception:
            cuda = None
        package = cupy_package(cuda)
        report["torch_cuda"] = cuda
        if package:
            wanted["cupy"] = package
        else:
            report["cupy"] = {"ok": False, "detail": f"no CuPy wheel for torch.version.cuda={cuda!r}"}
    failed = False
    before = importable([*wanted, "tensoradapt.torch"])
    for module, dist in wanted.items():
        ok, detail = before[module]
        entry: dict[str, Any] = {"dist": dist, "ok": ok, "was_importable": ok}
        if not ok:
            entry["attempts"] = []
            for cmd in install_commands(dist, args.wheels, args.site, args.pip_timeout):
                if args.dry_run:
                    entry["attempts"].append({"cmd": " ".join(cmd), "rc": None, "detail": "dry run"})
                    continue
                entry["attempts"].append(_pip(cmd, args.command_timeout))
                if entry["attempts"][-1]["rc"] == 0:
                    break
            ok, detail = (False, "dry run") if args.dry_run else importable([module])[module]
            entry["ok"] = ok
        entry["detail"] = detail
        report[module] = entry
        failed |= not ok and module != "cupy"
        print(f"{module:<18} {'ok' if ok else 'MISSING'}  {'' if ok else detail}", flush=True)
    ok, detail = before["tensoradapt.torch"]
    if not ok:  # retry: an install above may have brought what it lacked
        ok, detail = importable(["tensoradapt.torch"])["tensoradapt.torch"]
    entry = {"ok": ok, "was_importable": before["tensoradapt.torch"][0], "detail": detail}
    if not ok and not args.dry_run:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-e", str(ROOT)]
        entry["install"] = _pip(cmd, 120.0)
        entry["ok"], entry["detail"] = importable(["tensoradapt.torch"])["tensoradapt.torch"]
    report["tensoradapt.torch"] = entry
    failed |= not entry["ok"]
    print(f"{'tensoradapt.torch':<18} {'ok' if entry['ok'] else 'MISSING'}  {'' if entry['ok'] else entry['detail']}")
    if args.result:
        write_json(Path(args.result), report)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# Driver


def _strict(value: Any) -> Any:
    """``value`` with non-finite floats as strings (``"nan"``, ``"inf"``): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented strict JSON, atomically (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(payload), indent=1, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_section(name: str, device: str, smoke: bool, budget: Budget, fail: Sequence[str],
                items: dict[str, dict[str, Any]], on_record: Callable[[], None] | None = None) -> None:
    """Run one section's items into ``items`` (in this process).

    A CPU smoke run uses one torch thread: on a shared machine with few cores, torch's spinning
    worker threads make tiny steps take seconds instead of milliseconds."""
    if smoke and not device.startswith("cuda"):
        import torch

        torch.set_num_threads(1)
    ctx = Context(device=device, smoke=smoke, runner=Runner(budget=budget, items=items, fail=fail,
                                                             on_record=on_record))
    ctx.runner.cleanup = ctx.cleanup
    ctx.runner.run(f"{name}/section", lambda: SECTION_FUNCTIONS[name](ctx), timeout=budget.remaining() + 1)
    if items.get(f"{name}/section", {}).get("status") == "ok":
        del items[f"{name}/section"]  # only failures of the section as a whole are kept


def section_in_subprocess(name: str, args: argparse.Namespace, deadline: float, out_dir: Path,
                          items: dict[str, dict[str, Any]], final: float | None = None) -> None:
    """Run a section in a fresh interpreter, hard-killed ``SECTION_GRACE_S`` after its deadline
    (but no later than 10 s after ``final``, the whole run's deadline)."""
    part = out_dir / f".gpu_check_{name}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--section-out", str(part),
           "--deadline", repr(deadline), "--device", args.device]
    cmd += ["--smoke"] if args.smoke else []
    for pattern in args.fail:
        cmd += ["--fail", pattern]
    kill_at = deadline + SECTION_GRACE_S if final is None else min(deadline + SECTION_GRACE_S, final + 10.0)
    limit = max(1.0, kill_at - time.time())
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
        rc, stderr = out.returncode, out.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes)
                            else exc.stderr or "")
    with contextlib.suppress(OSError, json.JSONDecodeError):
        items.update(json.loads(part.read_text()))
    part.unlink(missing_ok=True)
    if rc is None:
        items[f"{name}/process"] = {"status": "timeout", "seconds": round(limit, 1),
                                    "error": f"section process killed after {limit:.0f} s",
                                    "stderr_tail": stderr[-3000:]}
    elif rc != 0:
        items[f"{name}/process"] = {"status": "error", "seconds": 0.0,
                                    "error": f"section process exited with {rc}", "stderr_tail": stderr[-3000:]}


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 if every item passed (or was skipped), 1 if any failed (JSON written either way)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    helpers = {"record-step": record_step, "merge-steps": merge_steps, "ensure-deps": ensure_deps}
    if argv and argv[0] in helpers:
        return helpers[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="helper sub-commands: record-step, merge-steps, ensure-deps")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON file (default {DEFAULT_OUT})")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on a CPU (tests)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all sections (default 400)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--steps-file", default=None, help="JSON lines of gpu_check.sh's steps to include")
    parser.add_argument("--isolate", choices=("process", "none"), default=None,
                        help="each section in its own subprocess (default on CUDA) or all in this one")
    parser.add_argument("--fail", action="append", default=[], help="item-name pattern made to fail (tests)")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--section-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.section is not None:  # a section subprocess
        items: dict[str, dict[str, Any]] = {}
        part = Path(args.section_out)
        run_section(args.section, args.device, args.smoke, Budget(deadline=args.deadline), args.fail, items,
                    on_record=lambda: write_json(part, items))
        write_json(part, items)
        return 0

    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    isolate = args.isolate or ("process" if args.device.startswith("cuda") else "none")
    started = time.perf_counter()
    budget = Budget(args.budget)
    out = Path(args.out)
    env = environment(args.device)
    payload: dict[str, Any] = {
        "schema": SCHEMA, "command": " ".join(["gpu_check.py", *argv]), "date": env["date"],
        "device": args.device, "smoke": args.smoke, "card": env["card"], "machine": env["machine"],
        "torch": env["torch"], "nvidia_smi": env["nvidia_smi"], "versions": env["versions"], "git": env["git"],
        "budget_s": args.budget, "isolate": isolate, "sections": sections,
        "steps": read_steps(args.steps_file), "items": {}, "summary": {}, "counts": {}, "elapsed_s": None,
    }
    items: dict[str, dict[str, Any]] = payload["items"]

    def save() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - started, 2)
        payload["summary"] = summarise(items)
        payload["counts"] = count_statuses(items)
        write_json(out, payload)

    save()
    if args.device.startswith("cuda") and not env["torch"].get("cuda_available"):
        items["cuda"] = {"status": "error", "seconds": 0.0, "error": "torch.cuda.is_available() is False"}
        sections = []
    for i, name in enumerate(sections):
        left = budget.remaining()
        share = SHARES[name] / sum(SHARES[s] for s in sections[i:])
        section_s = left * share
        if section_s < MIN_ITEM_S:
            items[f"{name}/section"] = {"status": "skipped", "seconds": 0.0,
                                        "reason": f"time budget: {left:.1f} s left of {args.budget:.0f} s"}
            save()
            continue
        deadline = time.time() + section_s
        print(f"== {name}: {section_s:.0f} s of {left:.0f} s left", file=sys.stderr, flush=True)
        if isolate == "process":
            section_in_subprocess(name, args, deadline, out.parent, items, final=budget.deadline)
        else:
            run_section(name, args.device, args.smoke, Budget(deadline=deadline), args.fail, items, on_record=save)
        save()
    save()
    print(markdown_summary(payload["summary"]))
    counts = payload["counts"]
    print(f"items: {counts}; JSON: {out}")
    for name, rec in items.items():
        if rec["status"] in ("error", "timeout"):
            print(f"  {rec['status']}: {name}: {rec.get('error', '')[:300]}")
    return 1 if counts.get("error") or counts.get("timeout") else 0


if __name__ == "__main__":
    sys.exit(main())
