"""Writing adapter files: atomically (a temporary file in the same folder, fsync, ``os.replace``),
with a header in one canonical order, and gathered from FSDP2's shards where the tensors are DTensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import tensoradapt._safetensors as safetensors_header

from ..distributed import dtensor_type, gather_full
from .layout import METADATA_KEY, glob_escape

__all__ = ["canonical_header", "safetensors_torch", "write_adapter", "write_bytes", "write_gathered"]


def safetensors_torch() -> Any:
    """``safetensors.torch`` (imported on first use; a clear error without it)."""
    try:
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - safetensors is a dependency of the torch extra
        raise ImportError("saving and loading adapters needs safetensors: pip install safetensors") from error
    return safetensors.torch


def write_adapter(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically; return the path.

    The tensors are copied to contiguous CPU tensors first.  A crash mid-write leaves either the
    old file or the new one, never a torn file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter files end in .safetensors, got {str(path)!r}")
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist")
    host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    header = {"format": "pt", METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    return write_bytes(path, canonical_header(safetensors_torch().save(host, metadata=header)))


def canonical_header(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its header re-serialised in a fixed order: safetensors
    writes the ``__metadata__`` entries in a per-process hash order, so the same adapter saved by
    two processes (two ranks, two runs) would differ in bytes.  Tensor data offsets are relative
    to the end of the header, so only the header changes; it is space-padded to a multiple of 8
    bytes as safetensors pads it."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    if isinstance(header.get(safetensors_header.METADATA_KEY), dict):
        header[safetensors_header.METADATA_KEY] = dict(sorted(header[safetensors_header.METADATA_KEY].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, fsync,
    ``os.replace``, fsync of the folder); return the path.

    A crash mid-write leaves the old file or the new one, never a torn file; a temporary file left
    by a killed write (``.NAME.<pid>.*.tmp``) is removed by the next write of the same file, unless
    its process still runs (a concurrent writer of the same path).  The file
    keeps the mode of the one it replaces (else ``open()``'s: 0666 minus the umask).
    """
    path = Path(path)
    if not path.parent.exists():
        raise FileNotFoundError(f"folder {str(path.parent)!r} does not exist")
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):  # left by a save that was killed
        if _writer_alive(stale, path.name):
            continue  # another process (or thread) is writing it now: not stale
        try:
            stale.unlink()
        except OSError:  # pragma: no cover - raced with another cleaner
            pass
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file 0600; give it the usual mode
            os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    try:  # make the rename durable where the platform allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return path
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)
    return path


def _writer_alive(temp: Path, name: str) -> bool:
    """Whether the temporary file ``temp`` must be left alone by a write of ``name``: it belongs to
    a write that may still run (``.NAME.<pid>.<random>.tmp`` of this process, i.e. another thread, or
    of a live process, e.g. another rank saving the same path), or it is not a temporary of ``NAME``
    at all (the glob also matches ``.NAME.bak.safetensors.<pid>.<random>.tmp`` of another file).
    ``.NAME.<random>.tmp`` (an older version's, no pid) and those of finished processes are stale."""
    parts = temp.name[len(name) + 2:-len(".tmp")].split(".")  # mkstemp's random part has no dot
    if len(parts) == 1:
        return False
    if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit() or len(parts[0]) > 10:
        return True
    pid = int(parts[0])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # alive under another user, or unknowable: keep it
        return True
    return True


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what ``open()`` would give (0666 minus the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_gathered(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                   metadata: dict[str, Any]) -> Path:
    """Write an adapter file from ``tensors`` that may be DTensors (FSDP2).

    Without DTensors this is :func:`write_adapter`.  With DTensors it is a collective over
    their device mesh: every rank gathers the full tensors (the shards live on different ranks),
    the rank at mesh coordinate 0 alone writes the file (concurrent writers of one path would
    race), and all ranks then learn whether the write succeeded (the file exists when any rank
    returns; a failure raises on every rank).
    """
    dtensor = dtensor_type()
    sharded = [t for t in tensors.values() if dtensor is not None and isinstance(t, dtensor)]
    if not sharded:
        return write_adapter(path, tensors, metadata)
    import torch.distributed as dist

    mesh = sharded[0].device_mesh
    full = gather_full(tensors)
    coordinate = mesh.get_coordinate()
    writer = coordinate is not None and all(c == 0 for c in coordinate)
    failure: BaseException | None = None
    if writer:
        try:
            written = write_adapter(path, full, metadata)
        except BaseException as error:  # reported to the other ranks below, then raised here
            failure = error
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=mesh.device_type)
    for dim in range(mesh.ndim):  # dimension by dimension: the writer's flag reaches every rank of the mesh
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if failure is not None:
        raise failure
    if int(flag.item()):
        raise RuntimeError(f"the rank writing the adapter file {str(path)!r} (mesh coordinate 0) failed; "
                           "see its error")
    return written if writer else Path(path)
