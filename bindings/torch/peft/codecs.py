"""The PEFT codecs: one module per PEFT type, each holding its format's encode and decode.

Every codec module has ``PEFT_TYPE``, ``SUFFIXES`` (its tensors' key suffixes), ``OPTIONS`` (the
config options :func:`~tensoradapt.torch.import_peft` reads, with PEFT's defaults) and
``decode(options, entries, found, views, where) -> Decoded``; the LoRA, LoHa and LoKr codecs
``encode`` an exact form of the same name, the GLoRA codec a GLoRA source.
"""

from __future__ import annotations

from types import ModuleType

from . import glora, loha, lokr, lora

#: The codec of each PEFT type tensoradapt reads and writes.
CODECS: dict[str, ModuleType] = {codec.PEFT_TYPE: codec for codec in (lora, lokr, loha, glora)}
#: The codec writing each exact form of :func:`tensoradapt.superlora.forms.exact_form`.
BY_FORM: dict[str, ModuleType] = {"lora": lora, "loha": loha, "lokr": lokr}
