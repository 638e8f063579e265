"""The kohya codecs: one module per LyCORIS algorithm, each holding its format's encode and decode
(``SUFFIXES``; ``encode(source, target, form, pairs)`` of an exact form of the same name;
``check(entry, where)`` of a module's shapes; the values of the plan it makes)."""

from __future__ import annotations

from types import ModuleType

from . import loha, lokr, lora

#: The codec of each algorithm, which is also the exact form it writes natively.
CODECS: dict[str, ModuleType] = {"lora": lora, "lokr": lokr, "loha": loha}
#: The tensors of each algorithm a kohya file may hold per module (besides ``alpha``).
ALGORITHMS = {algo: codec.SUFFIXES for algo, codec in CODECS.items()}
