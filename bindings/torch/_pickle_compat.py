"""The module paths of earlier versions, kept only so that pickles of whole models load.

``torch.save(model)`` of an adapted model pickles the classes and functions the adapter installed
by their module path.  The torch bindings v3 (issue 23) moved them, so a model saved by an earlier
version (to commit 48104a3) would fail with ``ModuleNotFoundError: tensoradapt.torch.adapter``.
This module, imported by the package ``__init__`` (it imports the modules it needs), registers
lightweight alias modules in ``sys.modules`` for the old paths, each holding only the names such
pickles refer to (and adds ``_SavePretrained`` to :mod:`tensoradapt.torch.hf`, where it lived).
Nothing else should import the old paths: they are not API, and new code finds every name where
docs/architecture.md puts it.  Adapter files (safetensors) never needed this: they name no Python object.
"""

from __future__ import annotations

import sys
import types

from . import container, hf, modules
from .superlora import adapter, layer, passes

__all__: list[str] = []  # defines no public name; importing it registers the old paths

#: old module path -> {name an old pickle refers to: (the module that holds it now, its name there)}
OLD_PATHS: dict[str, dict[str, tuple[types.ModuleType, str]]] = {
    "tensoradapt.torch._shared": {
        "AdapterContainer": (container, "AdapterContainer"),
        "accept_base_keys": (modules, "accept_base_keys"),
        "report_base_keys": (modules, "report_base_keys"),
        "ThreadState": (modules, "ThreadState"),
    },
    "tensoradapt.torch._targets": {
        "WeightView": (modules, "WeightView"),
    },
    "tensoradapt.torch.adapter": {
        "SuperLoRAAdapter": (adapter, "SuperLoRAAdapter"),
        "SuperLoRALayer": (layer, "SuperLoRALayer"),
        "_report_original_weight": (layer, "_report_original_weight"),
        "_ForwardState": (passes, "ForwardState"),
    },
    "tensoradapt.torch.hf": {  # still a module: the name is added to it
        "_SavePretrained": (container, "_SavePretrained"),
    },
}


def _register() -> None:
    for path, names in OLD_PATHS.items():
        if path == hf.__name__:  # still a module: it gains the name
            module = hf
        else:
            doc = (f"Alias of names that moved, for pickles of earlier versions only ({', '.join(sorted(names))}); "
                   f"see {__name__}.")
            module = sys.modules.setdefault(path, types.ModuleType(path, doc))
        for old, (home, new) in names.items():
            setattr(module, old, getattr(home, new))


_register()
