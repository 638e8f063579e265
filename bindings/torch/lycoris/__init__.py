r"""LyCORIS / kohya ``.safetensors`` files out and in: the diffusion ecosystem's adapter format.

ComfyUI, LyCORIS, kohya-ss' scripts and diffusers' ``load_lora_weights`` read one ``.safetensors``
file whose keys are ``<kohya name>.<tensor>``, the kohya name being a prefix and the module path
with ``.`` → ``_`` (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``).  Per
module (``o`` outputs, ``n = in/groups · Π kernel``): LoRA (LoCon on a convolution)
``lora_down.weight (r, in/groups, *kernel)``, ``lora_up.weight (o, r, 1…)``, ``ΔW = (α/r) up down``;
LoKr ``lokr_w1 (a, b)`` or ``lokr_w1_a`` + ``lokr_w1_b``, ``lokr_w2 (c, e)`` (``(c, in_n, *kernel)``
on a convolution) or ``lokr_w2_a`` + ``lokr_w2_b``, ``ΔW = (α/r) w1 ⊗ w2``; LoHa ``hada_w1_a (o, r)``,
``hada_w1_b (r, n)``, ``hada_w2_a``, ``hada_w2_b``, ``ΔW = (α/r) (w1a w1b) ⊙ (w2a w2b)``; each with a
scalar ``alpha``.

LyCORIS's scale conventions (``lycoris.modules``): ``α/r`` with ``r`` the LoRA rank (LoHa:
``hada_w1_b``'s rows; LoKr: the rank of ``w1_a``, else ``w2_a``); a missing ``alpha`` or ``α = 0``
means ``α = r`` (scale 1); a LoKr whose two blocks are both full has scale 1 whatever ``alpha`` says.

:func:`export_lycoris` writes an adapter so: LoRA, LoKr and LoHa targets natively (exact), any
other target (grouped, folded, projected, shapes LyCORIS has no name for, LoKr blocks LyCORIS would
lay out differently, GLoRA) as a LoRA/LoCon holding its truncated SVD, through
:mod:`tensoradapt.torch.peft.svd`, with each target's relative error reported.
:func:`import_lycoris` reads such a file back into an adapter on a model.  docs/interop.md
(Diffusion) has the details and the peers it is tested with.

Modules: one codec per algorithm with encode and decode side by side (:mod:`.lora`, :mod:`.loha`,
:mod:`.lokr`, reusing the PEFT codecs' layouts where the rule is the same; the table in
:mod:`.codecs`), :mod:`.entry` (the scale rule both ways, one module of a file), :mod:`.names`
(kohya names both ways), :mod:`.svd`, :mod:`.reader`, and the entry points :mod:`.export` and
:mod:`.load`.
"""

from __future__ import annotations

from .export import LycorisExport, export_lycoris
from .load import import_lycoris
from .names import KOHYA_PREFIXES, kohya_names, kohya_prefix

__all__ = ["KOHYA_PREFIXES", "LycorisExport", "export_lycoris", "import_lycoris", "kohya_names", "kohya_prefix"]
