"""Adapter files and folders: our own safetensors IO.

An adapter file is one safetensors file whose header carries our JSON metadata; a folder holds it
as ``adapter_model.safetensors`` beside ``adapter_config.json`` and a ``README.md`` model card.

``layout``
    The names and constants of files and folders, :class:`~.layout.AdapterFileError`, and where
    an adapter of a folder lies (resolved once per read).
``write``
    Atomic writes (a temporary file, fsync, ``os.replace``); FSDP2's gathering write.
``read``
    The strict read: header, metadata, ``adapter_config.json``, tensors, every check a file alone
    allows (the method's own checks come from the registry, :mod:`tensoradapt.torch.methods`).
``card``
    The ``README.md`` model card.
``adapter``
    :class:`~.adapter.AdapterFiles`, the file half of every adapter (``save``, ``save_pretrained``,
    ``state_dict_keys``, ``copy_tensors``).

Modules import these submodules directly (this ``__init__`` re-exports nothing).
"""
