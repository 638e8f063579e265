"""``tensoradapt compare``: dE/dL/dR of two sets of weight updates (safetensors files) and a plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Any

import tensoradapt._safetensors as safetensors_header

from ._args import UsageError, one_line, positive_int

__all__ = ["add_parser", "run"]

_FLOAT_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}
#: Most entries of one compared tensor (larger ones are refused before they are read: loading
#: and decomposing them would need gigabytes; docs/reliability.md).
MAX_COMPARE_ENTRIES = 2**26
#: Plot formats (what matplotlib writes without extra packages).
PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "pgf", "raw",
                "rgba")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to the ``sub`` subparsers; return its parser."""
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
    return compare


def _progress(enabled: bool, total: int, desc: str) -> Any:
    """A tqdm wrapper on stderr (off when disabled, on a non-terminal, or without tqdm)."""
    if not enabled:
        return lambda items: items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return lambda items: items
    return lambda items: tqdm(items, total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


def _read_header(path: str) -> safetensors_header.SafetensorsHeader:
    """The checked header of ``path`` (the library's one reader); ``UsageError`` naming the file."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: not a regular file" if os.path.exists(path) else f"{path}: no such file")
    try:
        return safetensors_header.read_header(path)
    except safetensors_header.SafetensorsHeaderError as exc:
        raise UsageError(f"{path}: {exc}") from None
    except OSError as exc:
        raise UsageError(one_line(exc)) from None


def _load_tensor(path: str, info: safetensors_header.SafetensorsHeader, key: str) -> Any:
    """One tensor as a float NumPy array: F16/F32/F64 through ``safetensors.numpy`` (no pickle),
    BF16 decoded from its bytes (NumPy has no bfloat16)."""
    import numpy as np

    entry = info.header[key]
    dtype = entry["dtype"]
    if dtype == "BF16":
        raw = np.frombuffer(info.read_bytes(path, key), dtype="<u2")
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
    if dtype not in _FLOAT_DTYPES:
        raise UsageError(f"{path}: tensor {key!r} has dtype {dtype}; compare needs floating tensors "
                         f"({', '.join([*_FLOAT_DTYPES, 'BF16'])})")
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as fh:
        return fh.get_tensor(key)


def _default_plot_path(first: str, second: str) -> str:
    stem = f"{os.path.splitext(os.path.basename(first))[0]}_vs_{os.path.splitext(os.path.basename(second))[0]}"
    folder = os.path.dirname(os.path.abspath(first))
    if not os.access(folder, os.W_OK):
        folder = os.getcwd()
    return os.path.join(folder, f"{stem}_geometry.png")


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
    """Exit 2 before any work when ``path`` cannot be written: its folder must exist, the path
    must be a regular file or not exist (never a device such as /dev/full, a FIFO or a folder),
    and creating it must work (a test create, removed again, catches /proc and read-only mounts)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: not a regular file")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: cannot write there")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or type(exc).__name__})") from None
    os.close(fd)
    os.unlink(path)


def _write_output(flag: str, path: str, write: Any) -> None:
    """Run ``write()``; a failure of the file system (full, vanished folder) is one line, exit 2."""
    try:
        write()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write ({exc.strerror or one_line(exc)})") from None


def _matched_keys(args: argparse.Namespace, infos: list[Any]) -> tuple[list[str], int]:
    """The common weight-matrix tensor names of the two files (``--filter`` applied) and how many
    common tensors were skipped for having fewer than 2 dimensions; ``UsageError`` otherwise."""
    regex = None
    if args.filter is not None:
        try:
            regex = re.compile(args.filter)
        except re.error as exc:
            raise UsageError(f"--filter {args.filter!r} is not a valid regular expression: {exc}") from None
    first, second = (info.tensors for info in infos)  # in storage order
    common = [k for k in first if k in second and (regex is None or regex.search(k))]
    if not common:
        raise UsageError(f"no common tensor names between {args.first} ({len(first)} tensors) and "
                         f"{args.second} ({len(second)} tensors)" + (f" matching {args.filter!r}" if regex else ""))
    for key in common:
        if first[key]["shape"] != second[key]["shape"]:
            raise UsageError(f"tensor {key!r} has shape {first[key]['shape']} in {args.first} but "
                             f"{second[key]['shape']} in {args.second}")
    keys = [k for k in common if len(first[k]["shape"]) >= 2]
    if not keys:
        raise UsageError(f"the {len(common)} common tensors have fewer than 2 dimensions (no weight matrices)")
    for key in keys:
        entries = math.prod(first[key]["shape"])
        if entries > MAX_COMPARE_ENTRIES:
            raise UsageError(f"tensor {key!r} has {entries:,} entries, more than the {MAX_COMPARE_ENTRIES:,} "
                             "compare reads (docs/reliability.md); select others with --filter")
    return keys, len(common) - len(keys)


def _output_paths(args: argparse.Namespace) -> str | None:
    """The plot path (None with ``--no-plot``), with ``--plot`` and ``--json`` checked before any work."""
    plot_path = None
    if not args.no_plot:
        plot_path = args.plot or _default_plot_path(args.first, args.second)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("writing the plot needs matplotlib (pip install matplotlib), or pass --no-plot") from None
        if not os.path.splitext(plot_path)[1]:
            plot_path += ".png"
        extension = os.path.splitext(plot_path)[1][1:].lower()
        if extension not in PLOT_FORMATS:
            raise UsageError(f"--plot {plot_path}: {extension!r} is not a plot format ({', '.join(PLOT_FORMATS)})")
        _check_writable("--plot", plot_path)
    if args.json:
        _check_writable("--json", args.json)
    return plot_path


def _compare_tensors(args: argparse.Namespace, infos: list[Any], keys: list[str]) -> list[Any]:
    """One geometry record per tensor name (both files' tensors finite, compared in float32 or wider)."""
    import numpy as np

    from ..analysis import geometry

    records = []
    progress = _progress(not args.no_progress, len(keys), "compare")
    for key in progress(keys):
        try:
            p = _load_tensor(args.first, infos[0], key)
            q = _load_tensor(args.second, infos[1], key)
        except Exception as exc:  # safetensors' own error type for data it cannot read
            raise UsageError(f"tensor {key!r}: cannot read it ({one_line(exc)})") from None
        for path, value in ((args.first, p), (args.second, q)):
            if not np.isfinite(value).all():
                raise UsageError(f"tensor {key!r} in {path} has NaN or infinite entries")
        dtype = np.result_type(p.dtype, q.dtype, np.float32)
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                record = geometry.compare_pair(p.astype(dtype, copy=False), q.astype(dtype, copy=False), name=key,
                                               k=args.k, paired=args.paired, method=args.method)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:  # e.g. norms past the float range
            raise UsageError(f"tensor {key!r}: cannot compare it ({one_line(exc)})") from None
        records.append(record)
    return records


def run(args: argparse.Namespace) -> int:
    """Run ``compare`` on parsed arguments; ``UsageError`` for bad input."""
    from ..analysis import geometry, report

    infos = [_read_header(path) for path in (args.first, args.second)]
    keys, skipped = _matched_keys(args, infos)
    plot_path = _output_paths(args)
    records = _compare_tensors(args, infos, keys)
    summary = geometry.aggregate_by_kind(records)
    print(report.format_similarity_table(records, summary, args.k, args.paired))
    if skipped:
        print(f"({skipped} common tensors with fewer than 2 dimensions skipped)")
    if args.json:
        payload = {"records": [r.as_dict() for r in records],
                   "by_kind": {kind: dataclasses.asdict(s) for kind, s in summary.items()}}
        def write_json() -> None:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(_finite_json(payload), fh, indent=1, allow_nan=False)

        _write_output("--json", args.json, write_json)
        print(f"records written to {args.json}")
    if plot_path is not None:
        from ..analysis import plot

        title = f"{os.path.basename(args.first)} vs {os.path.basename(args.second)}" + (
            " (paired cosines)" if args.paired else "")
        _write_output("--plot", plot_path, lambda: plot.plot_similarity(records, plot_path, title, args.k))
        print(f"plot written to {plot_path}")
    return 0
