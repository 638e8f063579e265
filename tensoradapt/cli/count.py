"""``tensoradapt count``: a parameter table of presets, or a budget sweep, for target shapes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._args import UsageError, non_negative_int, one_line, parameter_count, positive_int, rank_list

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``count`` subcommand to the ``sub`` subparsers; return its parser."""
    count = sub.add_parser(
        "count", help="parameter table or budget sweep for target shapes",
        description="Trainable parameters of presets on the target shapes, or (--budget) every family "
                    "configuration that fits a parameter budget.",
        epilog="SHAPES: 'OxN' (one weight), 'SxOxN' (S weights of OxN), comma-separated "
               "(e.g. 24x768x768 or 768x768,768x3072), or a .json file (list of shapes, list of "
               "{name, shape[, count]}, or {name: shape}) or a .safetensors file (header only). "
               "PRESET: name[:key=value,...] with name in dense, lora, lokr, krona, loha, lotr, lonkr, "
               "lorta, e.g. lora, lorta:order=3,groups=1, lokr:factor=8.")
    count.add_argument("shapes", metavar="SHAPES", help="target shapes or a .json/.safetensors file")
    count.add_argument("--preset", action="append", metavar="PRESET",
                       help="preset to count (repeatable; default: a selection of every family)")
    count.add_argument("--rank", type=rank_list, metavar="R[,R...]",
                       help="ranks for presets given without one (default 1,2,4,8,16)")
    count.add_argument("--budget", type=parameter_count, metavar="N", help="budget sweep: configurations with at "
                       "most N parameters (40000, 40k, 1.5M)")
    count.add_argument("--min-params", type=parameter_count, default=0, metavar="N", help="budget sweep lower bound")
    count.add_argument("--family", action="append", metavar="FAMILY",
                       help="budget sweep family (repeatable; default all)")
    count.add_argument("--top", type=non_negative_int, default=25, metavar="T",
                       help="budget sweep: show the T largest configurations that fit (0: all; default 25)")
    count.add_argument("--filter", metavar="REGEX", help="keep only targets whose name matches (files)")
    count.add_argument("--min-ndim", type=positive_int, default=2, metavar="D",
                       help="keep only tensors with at least D dimensions (files; default 2)")
    count.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return count


def run(args: argparse.Namespace) -> int:
    """Run ``count`` on parsed arguments; ``UsageError`` for bad input."""
    from ..analysis import report
    from ..analysis import shapes as sh
    from ..superlora.budget import FAMILIES

    try:
        targets = sh.parse_shapes(args.shapes, min_ndim=args.min_ndim, pattern=args.filter)
    except (OSError, sh.ShapeSourceError) as exc:
        raise UsageError(one_line(exc)) from None
    if not targets:
        raise UsageError(f"{args.shapes!r} holds no target with at least {args.min_ndim} dimensions"
                         + (f" matching {args.filter!r}" if args.filter else ""))
    if args.budget is not None:
        families = args.family or list(FAMILIES)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise UsageError(f"unknown family {unknown[0]!r}; known families are {', '.join(FAMILIES)}")
        try:
            entries = sh.budget_sweep(targets, args.budget, families, min_params=args.min_params,
                                      top=args.top or None)
        except ValueError as exc:
            raise UsageError(one_line(exc)) from None
        if args.json:
            print(json.dumps([{"family": e.family, "params": e.params, "config": e.config.to_dict()}
                              for e in entries], indent=1))
        else:
            print(report.format_budget_sweep(targets, entries, args.budget))
        return 0
    presets = args.preset or list(sh.DEFAULT_PRESETS)
    try:
        for spec in presets:  # validate every preset before counting anything
            sh.parse_preset(spec, [t.shape for t in targets], args.rank)
        rows = sh.count_table(targets, presets, ranks=args.rank)
    except ValueError as exc:
        raise UsageError(one_line(exc)) from None
    if args.json:
        print(json.dumps([{"label": r.label, "params": r.params, "groups": r.groups, "note": r.note,
                           "config": r.config.to_dict()} for r in rows], indent=1))
    else:
        print(report.format_count_table(targets, rows))
    return 0
