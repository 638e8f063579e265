"""Temporary shim: the LyCORIS / kohya code lives in the package :mod:`tensoradapt.torch.lycoris`
(one codec per algorithm); this module re-exports its public names for importers not yet moved."""

from __future__ import annotations

from .lycoris import KOHYA_PREFIXES, LycorisExport, export_lycoris, import_lycoris, kohya_names, kohya_prefix

__all__ = ["KOHYA_PREFIXES", "LycorisExport", "export_lycoris", "import_lycoris", "kohya_names", "kohya_prefix"]
