"""``tensoradapt export-peft``: an adapter file or folder written as a PEFT adapter folder.

The command works on the adapter file alone: its metadata records every target's name, kind and
shape, which is all :func:`tensoradapt.torch.export_peft` needs (no base model is loaded).

Examples
--------
::

    tensoradapt export-peft gpt2-lora/ gpt2-lora-peft/                 # exact: LoRA, LoKr, LoHa, GLoRA
    tensoradapt export-peft gpt2-lorta.safetensors served/ --rank 16    # any SuperLoRA adapter, rank-16 SVD
    tensoradapt export-peft gpt2-lorta.safetensors served/ --rank exact # smallest rank within 1e-6

Bad input (no such file, not an adapter, a rank the targets cannot have, an output path that is a
file) exits with status 2 and one line on stderr.  An SVD export of many targets draws a progress
bar on stderr when stderr is a terminal (:func:`tensoradapt.torch.progress.progress_bar`, the bar
``tensoradapt demo`` and ``tensoradapt study`` draw too; ``progress_bar`` here is the same function,
importable from here as before, but the export looks it up in :mod:`tensoradapt.torch.progress` at
each call, so replace it there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tensoradapt.cli import OneLineParser, one_line

from .progress import progress_bar

__all__ = ["export_peft_main", "progress_bar"]

_PROG = "tensoradapt export-peft"
#: Largest rank accepted on the command line (the library's cap, SuperLoRAConfig MAX_RANK).
MAX_RANK = 2**24


def _rank(text: str) -> int | str:
    """argparse type: a positive rank or ``exact``."""
    if text == "exact":
        return text
    shown = text if len(text) <= 40 else text[:37] + "..."
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or not 1 <= int(text) <= MAX_RANK:
        raise argparse.ArgumentTypeError(f"{shown!r} is not a rank (a whole number from 1 to {MAX_RANK:,}, "
                                         "or 'exact')")
    return int(text)


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog=_PROG,
        description="Write a tensoradapt adapter (a .safetensors file or a save_pretrained folder) as a PEFT "
                    "adapter folder that peft.PeftModel.from_pretrained and LoRA servers load. LoRA, LoKr, LoHa "
                    "and GLoRA adapters are written exactly in their own PEFT method; with --rank, any SuperLoRA "
                    "adapter is written as a PEFT LoRA holding each target's best rank-r approximation of dW "
                    "(truncated SVD), and the relative error of every target is printed.",
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter file (.safetensors) or folder")
    parser.add_argument("out", metavar="OUT", help="output folder (created; existing PEFT files in it are replaced)")
    parser.add_argument("--rank", type=_rank, default=None, metavar="R",
                        help="export a rank-R PEFT LoRA by truncated SVD ('exact': the smallest rank whose "
                             "relative error is at most 1e-6); default: the adapter's own PEFT method, exactly")
    parser.add_argument("--base-model", default=None, metavar="NAME",
                        help="base_model_name_or_path written to adapter_config.json (default: what the adapter "
                             "file records, if anything)")
    return parser


def _error(message: str) -> int:
    print(f"{_PROG}: error: {one_line(message)}", file=sys.stderr)
    return 2


def export_peft_main(argv: list[str] | None = None) -> int:
    """Run ``tensoradapt export-peft``; returns the exit status (0 success, 2 bad input)."""
    args = _parser().parse_or_status(argv)
    if isinstance(args, int):  # --help, --version or a usage error
        return args
    if args.base_model is not None and not args.base_model.strip():
        return _error("--base-model is empty (give the base model's name or path, or leave the option out)")
    source, out = Path(args.adapter), Path(args.out)
    if not source.exists():
        return _error(f"no adapter file or folder at {str(source)!r}")
    if out.exists() and not out.is_dir():
        return _error(f"OUT {str(out)!r} exists and is not a folder")
    from .files.layout import AdapterFileError
    from .peft.export import export_peft

    try:
        result: Any = export_peft(source, out, rank=args.rank, base_model_name_or_path=args.base_model)
    except FileNotFoundError as exc:
        return _error(str(exc))
    except (AdapterFileError, ValueError, TypeError) as exc:
        return _error(str(exc))
    except OSError as exc:  # reading the adapter or writing OUT
        where = exc.filename if exc.filename is not None else out
        return _error(f"{str(where)!r}: {exc.strerror or type(exc).__name__}")
    print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(export_peft_main())
