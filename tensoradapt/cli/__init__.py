"""The ``tensoradapt`` command line: ``count``, ``compare``, and the commands other packages add (``demo``).

Examples
--------
::

    tensoradapt count 24x768x768                          # parameter table of the default presets
    tensoradapt count 24x768x768 --preset lora --preset lorta:order=3,groups=1 --rank 1,4,8
    tensoradapt count model.safetensors --budget 40k      # budget sweep (header read only)
    tensoradapt compare lora.safetensors dense.safetensors --plot geometry.png
    tensoradapt demo --help

Every subcommand has ``--help``.  Bad input (a missing file, an unknown preset, malformed shapes)
exits with status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["main"]

_PROG = "tensoradapt"
_FLOAT_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: message``), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------------
# small parsers
# ---------------------------------------------------------------------------------------------
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def _count(text: str) -> int:
    """A parameter count: ``40000``, ``40_000``, ``40k``, ``1.5M``."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgGbB]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count (e.g. 40000, 40k, 1.5M)")
    value = float(match.group(1).replace("_", "")) * _SUFFIXES[match.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of parameters")
    return int(value)


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        ranks = []
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated positive integers (e.g. 1,2,4,8)")
    return ranks


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (also used by the demo's parser)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = f"{exc.filename}: no such file"
    return " ".join(text.split())


def _progress(enabled: bool, total: int, desc: str) -> Any:
    """A tqdm wrapper on stderr (off when disabled, on a non-terminal, or without tqdm)."""
    if not enabled:
        return lambda items: items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return lambda items: items
    return lambda items: tqdm(items, total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


# ---------------------------------------------------------------------------------------------
# count
# ---------------------------------------------------------------------------------------------
def _cmd_count(args: argparse.Namespace) -> int:
    from ..analysis import shapes as sh
    from ..superlora.budget import FAMILIES

    try:
        targets = sh.parse_shapes(args.shapes, min_ndim=args.min_ndim, pattern=args.filter)
    except (OSError, sh.ShapeSourceError) as exc:
        raise UsageError(_one_line(exc)) from None
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
            raise UsageError(_one_line(exc)) from None
        if args.json:
            print(json.dumps([{"family": e.family, "params": e.params, "config": e.config.to_dict()}
                              for e in entries], indent=1))
        else:
            print(sh.format_budget_sweep(targets, entries, args.budget))
        return 0
    presets = args.preset or list(sh.DEFAULT_PRESETS)
    try:
        for spec in presets:  # validate every preset before counting anything
            sh.parse_preset(spec, [t.shape for t in targets], args.rank)
        rows = sh.count_table(targets, presets, ranks=args.rank)
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from None
    if args.json:
        print(json.dumps([{"label": r.label, "params": r.params, "groups": r.groups, "note": r.note,
                           "config": r.config.to_dict()} for r in rows], indent=1))
    else:
        print(sh.format_count_table(targets, rows))
    return 0


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------
def _load_tensor(path: str, header: dict[str, Any], key: str) -> Any:
    """One tensor as a float NumPy array: F16/F32/F64 through ``safetensors.numpy`` (no pickle),
    BF16 decoded from its bytes (NumPy has no bfloat16)."""
    import numpy as np

    entry = header[key]
    dtype = entry["dtype"]
    if dtype == "BF16":
        begin, end = entry["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(8 + _header_length(path) + begin)
            raw = np.frombuffer(fh.read(end - begin), dtype="<u2")
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
    if dtype not in _FLOAT_DTYPES:
        raise UsageError(f"{path}: tensor {key!r} has dtype {dtype}; compare needs floating tensors "
                         f"({', '.join([*_FLOAT_DTYPES, 'BF16'])})")
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as fh:
        return fh.get_tensor(key)


def _header_length(path: str) -> int:
    import struct

    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


def _default_plot_path(first: str, second: str) -> str:
    stem = f"{os.path.splitext(os.path.basename(first))[0]}_vs_{os.path.splitext(os.path.basename(second))[0]}"
    folder = os.path.dirname(os.path.abspath(first))
    if not os.access(folder, os.W_OK):
        folder = os.getcwd()
    return os.path.join(folder, f"{stem}_geometry.png")


def _plot(records: Sequence[Any], path: str, title: str, k: int) -> None:
    """dE, dL and dR against the layer index, one line per weight kind (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    kinds = list(dict.fromkeys(r.kind for r in records))
    for ax, field, label in zip(fig.subplots(1, 3), ("dE", "dL", "dR"),
                                ("dE = ‖P−Q‖/‖Q‖  (→ 0)", f"dL, left top-{k}  (→ 1)", f"dR, right top-{k}  (→ 1)"),
                                strict=True):
        for kind in kinds:
            values = [getattr(r, field) for r in records if r.kind == kind]
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=kind)
        ax.set_title(label)
        ax.set_xlabel("layer (order within kind)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if field != "dE":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=110)


def _format_records(records: Sequence[Any], summary: dict[str, Any], k: int, paired: bool) -> str:
    width = max([len("weight"), *(len(r.name) for r in records)])
    kind_w = max([len("kind"), *(len(r.kind) for r in records)])
    measure = "paired cosine" if paired else "subspace overlap"
    lines = [f"dE = |P-Q|_F/|Q|_F, dL/dR = top-{k} {measure} of left/right singular vectors "
             f"(P = first file, Q = second)",
             f"{'weight':<{width}} {'kind':<{kind_w}} {'shape':>12} {'dE':>9} {'|P-Q|_F':>11} {'dL':>7} "
             f"{'dR':>7} {'k':>2}"]
    for r in records:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<{width}} {r.kind:<{kind_w}} {shape:>12} {r.dE:>9.4g} {r.dE_abs:>11.4g} "
                     f"{r.dL:>7.4f} {r.dR:>7.4f} {r.k_eff:>2}")
    lines.append("mean per kind:")
    for s in summary.values():
        lines.append(f"  {s.kind:<{kind_w}} n={s.count:<4} dE={s.dE:.4g}  dL={s.dL:.4f}  dR={s.dR:.4f}")
    return "\n".join(lines)


def _cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from ..analysis import geometry
    from ..analysis.shapes import ShapeSourceError, read_safetensors_header

    headers = []
    for path in (args.first, args.second):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
        try:
            headers.append(read_safetensors_header(path))
        except (OSError, ShapeSourceError) as exc:
            raise UsageError(_one_line(exc)) from None
    regex = None
    if args.filter is not None:
        try:
            regex = re.compile(args.filter)
        except re.error as exc:
            raise UsageError(f"--filter {args.filter!r} is not a valid regular expression: {exc}") from None
    first, second = (dict((k, v) for k, v in h.items() if k != "__metadata__") for h in headers)
    order = sorted(first, key=lambda key: first[key]["data_offsets"][0])
    common = [k for k in order if k in second and (regex is None or regex.search(k))]
    if not common:
        raise UsageError(f"no common tensor names between {args.first} ({len(first)} tensors) and "
                         f"{args.second} ({len(second)} tensors)" + (f" matching {args.filter!r}" if regex else ""))
    for key in common:
        if first[key]["shape"] != second[key]["shape"]:
            raise UsageError(f"tensor {key!r} has shape {first[key]['shape']} in {args.first} but "
                             f"{second[key]['shape']} in {args.second}")
    keys = [k for k in common if len(first[k]["shape"]) >= 2]
    skipped = len(common) - len(keys)
    if not keys:
        raise UsageError(f"the {len(common)} common tensors have fewer than 2 dimensions (no weight matrices)")
    plot_path = None
    if not args.no_plot:
        plot_path = args.plot or _default_plot_path(args.first, args.second)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("writing the plot needs matplotlib (pip install matplotlib), or pass --no-plot") from None
        if not os.path.splitext(plot_path)[1]:
            plot_path += ".png"
        _check_writable("--plot", plot_path)
    if args.json:
        _check_writable("--json", args.json)
    records = []
    progress = _progress(not args.no_progress, len(keys), "compare")
    for key in progress(keys):
        try:
            p = _load_tensor(args.first, headers[0], key)
            q = _load_tensor(args.second, headers[1], key)
        except Exception as exc:  # safetensors' own error type for data it cannot read
            raise UsageError(f"tensor {key!r}: cannot read it ({_one_line(exc)})") from None
        for path, value in ((args.first, p), (args.second, q)):
            if not np.isfinite(value).all():
                raise UsageError(f"tensor {key!r} in {path} has NaN or infinite entries")
        dtype = np.result_type(p.dtype, q.dtype, np.float32)
        records.append(geometry.compare_pair(p.astype(dtype, copy=False), q.astype(dtype, copy=False), name=key,
                                             k=args.k, paired=args.paired, method=args.method))
    summary = geometry.aggregate_by_kind(records)
    print(_format_records(records, summary, args.k, args.paired))
    if skipped:
        print(f"({skipped} common tensors with fewer than 2 dimensions skipped)")
    if args.json:
        payload = {"records": [r.as_dict() for r in records],
                   "by_kind": {kind: dataclasses.asdict(s) for kind, s in summary.items()}}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_finite_json(payload), fh, indent=1, allow_nan=False)
        print(f"records written to {args.json}")
    if plot_path is not None:
        _plot(records, plot_path, f"{os.path.basename(args.first)} vs {os.path.basename(args.second)}"
              + (" (paired cosines)" if args.paired else ""), args.k)
        print(f"plot written to {plot_path}")
    return 0


def _finite_json(value: Any) -> Any:
    """``value`` with NaN and infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _check_writable(flag: str, path: str) -> None:
    """Exit 2 before any work when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.isdir(path) or not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: cannot write there")


# ---------------------------------------------------------------------------------------------
# commands from other packages (the demo, the study), found through an entry point
# ---------------------------------------------------------------------------------------------
#: Entry-point group of the commands other packages add; each entry names ``module:function`` with
#: ``function(argv: list[str]) -> int``.  ``tensoradapt demo`` and ``tensoradapt study`` are such
#: commands (they train torch models, so the core cannot import them).
COMMAND_GROUP = "tensoradapt.commands"


def plugin_commands() -> dict[str, Any]:
    """The installed commands of :data:`COMMAND_GROUP`, by name (entry points, not yet loaded)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP) if ep.name not in ("count", "compare")}


def _run_plugin(name: str, entry: Any, argv: list[str]) -> int:
    try:
        command = entry.load()
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing.split(".")[0] == "tensoradapt":
            raise UsageError(f"the {name} command is not available in this installation (no module {missing})") \
                from None
        raise UsageError(f"the {name} command needs the package {missing!r}: pip install 'tensoradapt[demo]'") \
            from None
    result = command(list(argv))
    return int(result) if result is not None else 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------
def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .._version import __version__

    parser = OneLineParser(prog=_PROG, description="SuperLoRA-family adapters: parameter tables, budget sweeps, "
                     "geometric comparison of weight updates, and the demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

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
    count.add_argument("--rank", type=_ranks, metavar="R[,R...]",
                       help="ranks for presets given without one (default 1,2,4,8,16)")
    count.add_argument("--budget", type=_count, metavar="N", help="budget sweep: configurations with at most N "
                       "parameters (40000, 40k, 1.5M)")
    count.add_argument("--min-params", type=_count, default=0, metavar="N", help="budget sweep lower bound")
    count.add_argument("--family", action="append", metavar="FAMILY",
                       help="budget sweep family (repeatable; default all)")
    count.add_argument("--top", type=non_negative_int, default=25, metavar="T",
                       help="budget sweep: show the T largest configurations that fit (0: all; default 25)")
    count.add_argument("--filter", metavar="REGEX", help="keep only targets whose name matches (files)")
    count.add_argument("--min-ndim", type=positive_int, default=2, metavar="D",
                       help="keep only tensors with at least D dimensions (files; default 2)")
    count.add_argument("--json", action="store_true", help="print JSON instead of a table")

    compare = sub.add_parser(
        "compare", help="dE/dL/dR of two sets of weight updates (safetensors) and a plot",
        description="Geometric similarity per weight of the updates in FIRST (P, e.g. an adapter's merged "
                    "ΔW) against SECOND (Q, e.g. dense fine-tuning's ΔW), matched by tensor name: "
                    "dE = ‖P−Q‖_F/‖Q‖_F, dL/dR = ‖U_P,kᵀU_Q,k‖_F²/k on the top-k left/right singular "
                    "vectors; means per weight kind (query, value, …); writes a PNG plot.")
    compare.add_argument("first", metavar="FIRST.safetensors", help="the updates to analyse (P)")
    compare.add_argument("second", metavar="SECOND.safetensors", help="the reference updates (Q)")
    compare.add_argument("-k", "--k", type=positive_int, default=5, help="leading singular vectors (default 5)")
    compare.add_argument("--paired", action="store_true",
                         help="paired cosines (1/k)Σ|⟨u_P,j, u_Q,j⟩| instead of the subspace overlap")
    compare.add_argument("--method", choices=("auto", "full", "svds"), default="auto",
                         help="SVD: full LAPACK, ARPACK top-k, or auto (ARPACK from side 2048)")
    compare.add_argument("--filter", metavar="REGEX", help="compare only tensors whose name matches")
    compare.add_argument("--plot", metavar="PATH", help="PNG path (default: FIRST_vs_SECOND_geometry.png "
                         "next to FIRST, or in the current folder)")
    compare.add_argument("--no-plot", action="store_true", help="do not write a plot")
    compare.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")

    for name, entry in sorted(plugin_commands().items()):
        sub.add_parser(name, add_help=False, help=f"runs {entry.value} (`{_PROG} {name} --help` lists its options)")
    return parser, {"count": count, "compare": compare}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 bad input)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if arguments[:1] and arguments[0] in plugins:  # everything after the name belongs to it (--help too)
        name = arguments[0]
        try:
            return _run_plugin(name, plugins[name], arguments[1:])
        except UsageError as exc:
            print(f"{_PROG} {name}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
    parser, _ = _build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "count":
            return _cmd_count(args)
        return _cmd_compare(args)
    except UsageError as exc:
        print(f"{_PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `tensoradapt count … | head`: the reader left, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush cannot fail again
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
