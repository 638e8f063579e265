r"""PEFT adapter folders in and out, and any SuperLoRA adapter served as a PEFT LoRA.

:func:`export_peft` writes a folder that ``peft.PeftModel.from_pretrained(base, folder)`` loads
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names
``base_model.model.<module>.<tensor>``); peft itself is not needed to write it.

* **Exact** (``rank=None``): the LoRA, LoKr and LoHa presets (and any SuperLoRA target whose
  ``ΔW = s·L R`` is a low-rank product of its own ``(o, n)`` shape, a Kronecker product of the
  LyCORIS factorisation, or a Hadamard product of two such products:
  :func:`tensoradapt.superlora.forms.exact_form`) and GLoRA, each in its own PEFT method, with
  PEFT's conventions where they differ from LyCORIS: PEFT's LoKr always scales by ``α/r``
  (LyCORIS uses 1 when the second block is full) and factorises a dimension by a
  ``decompose_factor`` that divides it as ``(factor, dim/factor)`` unsorted.  Every scale is
  carried by ``lora_alpha``/``alpha`` (``alpha_pattern`` where targets differ), so PEFT's
  ``ΔW = (α/r)·…`` equals ours; what PEFT cannot express is refused with a message.
* **Rank-r** (``rank=r`` or ``"exact"``): any SuperLoRA adapter (LoRTA, LoNKr, LoTR, Fastfood,
  grouped, …) as a PEFT LoRA whose target ``i`` holds the best rank-``r`` approximation of
  ``ΔW_i`` (:mod:`~tensoradapt.torch.peft.svd`), the relative error reported per target.

:func:`import_peft` reads a PEFT LoRA, LoKr, LoHa or GLoRA folder into the equivalent tensoradapt
adapter (attached, trainable, savable with ``adapter.save``), refusing what it cannot represent
exactly.  ``rank_pattern`` / ``alpha_pattern`` are resolved per adapted module as PEFT does; a
LoRA or LoHa whose modules differ becomes one adapter of rank ``R = max r_i`` (smaller ranks
zero-padded, other scales folded into the first factor).  Nothing is unpickled; the JSON is
parsed strictly and every tensor shape is checked from the safetensors header before any tensor
is read.

Modules: one codec per PEFT type holding its encode and decode side by side (:mod:`.lora`,
:mod:`.loha`, :mod:`.lokr`, :mod:`.glora`; the table in :mod:`.codecs`), :mod:`.svd` (the rank-r
export), :mod:`.config` (reading ``adapter_config.json``), :mod:`.source` (the export source),
:mod:`.layout` (what every PEFT folder shares), :mod:`.folder` (the folder on disk),
:mod:`.decoded`, and the two entry points :mod:`.export` and :mod:`.load`.  The SVD export's
settings (:data:`~tensoradapt.torch.peft.svd.EXACT_TOLERANCE`,
:data:`~tensoradapt.torch.peft.svd.ONE_THREAD_SVD_SIDE`,
:data:`~tensoradapt.torch.peft.svd.PROGRESS_MIN_TARGETS`) live in :mod:`.svd`, which reads them at
each call: read or change them there.
"""

from __future__ import annotations

from .export import PeftExport, export_peft
from .layout import PEFT_CONFIG_FILE
from .load import import_peft

# The SVD export's settings (EXACT_TOLERANCE, ONE_THREAD_SVD_SIDE, PROGRESS_MIN_TARGETS) are not
# re-exported: they are read from .svd at each call, so a copy here would be a patch point that does nothing.
__all__ = ["PEFT_CONFIG_FILE", "PeftExport", "export_peft", "import_peft"]
