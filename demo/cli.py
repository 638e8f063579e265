"""``tensoradapt demo``: the argument parser and :func:`main` (also ``python -m tensoradapt.demo``)."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

from tensoradapt.cli import OneLineParser, non_negative_int, positive_int

from .catalog import DEFAULT_METHODS, QUICK_METHODS, methods
from .report import format_table
from .runner import ResumeError, run
from .train import DemoSettings

__all__ = ["main"]

_PROG = "tensoradapt demo"


def _method_list(text: str) -> list[str]:
    """argparse type of ``--methods``: comma-separated known method names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = methods()
    unknown = [n for n in names if n not in known]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method")
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _default_out() -> Path:
    """A new ``./tensoradapt-demo-YYYYmmdd-HHMMSS`` (with a ``-N`` suffix if that exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(f"tensoradapt-demo-{stamp}")
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(f"tensoradapt-demo-{stamp}-{suffix}")
    return path


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and methods (under a minute on two cores)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: a new ./tensoradapt-demo-YYYYmmdd-HHMMSS); results are written "
                             "as each method finishes, and rerunning with the same --out and options resumes a "
                             "stopped run")
    parser.add_argument("--fresh", action="store_true",
                        help="discard what an earlier run left in --out and start over (default: resume it)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--methods", type=_method_list, metavar="M[,M...]",
                        help="comma-separated subset of the methods below (default: all; --quick: "
                             f"all but {', '.join(m for m in DEFAULT_METHODS if m not in QUICK_METHODS)})")
    parser.add_argument("--steps", type=positive_int, metavar="N", help="transfer steps per method")
    parser.add_argument("--pretrain-steps", type=positive_int, metavar="N", help="pretraining steps")
    parser.add_argument("--repeats", type=positive_int, metavar="R",
                        help="transfer runs per method with different seeds (default 3; --quick: 1)")
    parser.add_argument("--threads", type=positive_int, metavar="T",
                        help="torch threads (default 1, or what OMP_NUM_THREADS sets; more threads gain little on "
                             "this small model and lose much on shared cores)")
    parser.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> OneLineParser:
    listing = "\n".join(f"  {m.name:<14} {m.description}" for m in methods().values())
    parser = OneLineParser(
        prog=_PROG,
        description="Pretrain a tiny ViT on scikit-learn's digits 0-4, transfer it to digits 5-9 with dense "
                    "fine-tuning, LoRA and SuperLoRA variants (adapters on query/value), and report accuracy, "
                    "trainable parameters, time and the dE/dL/dR geometry of each ΔW against the dense one.",
        epilog=f"methods:\n{listing}\n\nWrites results.json, results.md and pareto.png into the output folder "
               "and prints its path; results.json and results.md are rewritten as each method finishes, and the "
               "run's progress is kept in OUT/demo-progress/ so that a stopped run resumes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return parser


def _settings(args: argparse.Namespace) -> DemoSettings:
    """:class:`DemoSettings` of the run: the full or quick defaults with the step and repeat options."""
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.steps is not None:
        settings = replace(settings, transfer_steps=args.steps)
    if args.pretrain_steps is not None:
        settings = replace(settings, pretrain_steps=args.pretrain_steps)
    if args.repeats is not None:
        settings = replace(settings, repeats=args.repeats)
    return settings


def _error(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def missing_packages(plot: bool) -> list[str]:
    """The optional packages the run needs (scikit-learn; matplotlib for the plot) that are not installed."""
    needed = {"sklearn": "scikit-learn"} | ({"matplotlib": "matplotlib"} if plot else {})
    return [package for module, package in needed.items() if importlib.util.find_spec(module) is None]


def usable_folder(out: Path) -> str | None:
    """``None`` if ``out`` can be created and written, else why not (checked before any training,
    so a bad folder cannot lose a finished run)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tensoradapt-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def limit_interop_threads() -> None:
    """One torch inter-op thread (the demo runs nothing in parallel across operators); a no-op once
    torch has started inter-op work in this process, which fixes the count."""
    import torch

    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the demo from the command line; returns the exit status (2 for bad arguments, 130 when
    interrupted: the finished methods are in the output folder and a rerun resumes)."""
    args = _parser().parse_or_status(argv)
    if isinstance(args, int):  # --help, --version or a usage error
        return args
    missing = missing_packages(plot=not args.no_plot)
    if missing:
        return _error(f"the demo needs {' and '.join(missing)} (pip install 'tensoradapt[demo]')")
    out = Path(args.out) if args.out else _default_out()
    problem = usable_folder(out)
    if problem is not None:
        return _error(f"--out {str(out)!r} cannot be used as the results folder ({problem})")
    limit_interop_threads()
    try:
        result = run(args.methods, quick=args.quick, seed=args.seed, settings=_settings(args),
                     progress=not args.no_progress, threads=args.threads, out=out, fresh=args.fresh,
                     plot=not args.no_plot)
    except ResumeError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130
    print()
    print(format_table(result))
    print()
    print(f"total {result.total_time_s:.1f} s; results written to {out.resolve()}")
    return 0
