"""Temporary shim: the PEFT code lives in the package :mod:`tensoradapt.torch.peft` (one codec per
format); this module re-exports its public names for importers not yet moved."""

from __future__ import annotations

from .peft import (
    EXACT_TOLERANCE,
    ONE_THREAD_SVD_SIDE,
    PEFT_CONFIG_FILE,
    PROGRESS_MIN_TARGETS,
    PeftExport,
    export_peft,
    import_peft,
)

__all__ = ["EXACT_TOLERANCE", "ONE_THREAD_SVD_SIDE", "PEFT_CONFIG_FILE", "PROGRESS_MIN_TARGETS", "PeftExport",
           "export_peft", "import_peft"]
