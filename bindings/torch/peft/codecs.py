"""The PEFT codecs: one module per PEFT type, each holding its format's encode and decode.

Every codec module has ``PEFT_TYPE``, ``SUFFIXES`` (its tensors' key suffixes), ``OPTIONS`` (the
config options :func:`~tensoradapt.torch.import_peft` reads, with PEFT's defaults) and
``decode(options, entries, found, views, where) -> Decoded``; the LoRA, LoHa and LoKr codecs
``encode`` the targets whose exact form (:func:`tensoradapt.superlora.forms.exact_form`) has their
name, the GLoRA codec a GLoRA source (:func:`tensoradapt.torch.peft.export.export_peft` chooses).
"""

from __future__ import annotations

from types import ModuleType

from . import glora, loha, lokr, lora

#: The codec of each PEFT type tensoradapt reads and writes.
CODECS: dict[str, ModuleType] = {codec.PEFT_TYPE: codec for codec in (lora, lokr, loha, glora)}
