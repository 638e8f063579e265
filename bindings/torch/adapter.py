"""Temporary re-export shim (issue 23): the old ``adapter`` module is the package :mod:`.superlora`.
Removed once nothing imports it."""

from .modules import ADAPTER_ATTRIBUTE
from .superlora.adapter import Adapter, SuperLoRAAdapter
from .superlora.layer import AdaptedLayer, SuperLoRALayer
from .superlora.method import attach_superlora, load_superlora
from .targets import check_targets

__all__ = ["ADAPTER_ATTRIBUTE", "AdaptedLayer", "Adapter", "SuperLoRAAdapter", "SuperLoRALayer",
           "attach_superlora", "check_targets", "load_superlora"]
