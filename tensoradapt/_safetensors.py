"""The one safetensors header reader (standard library only; the tensor data is never read).

A safetensors file is an 8-byte little-endian header length ``L``, ``L`` bytes of UTF-8 JSON,
and the tensors' bytes back to back.  :func:`read_header` reads the length and the header only
and checks everything the format promises before anyone trusts it:

* the length fits the file and :data:`MAX_HEADER_BYTES` (the reference implementation's limit);
* the JSON nests at most :data:`MAX_JSON_DEPTH` deep, has no floating-point number or NaN, and
  no repeated key;
* the header is an object; ``__metadata__``, if present, is an object of strings to strings;
* every other entry has a known ``dtype`` (:data:`DTYPE_BITS`), a ``shape`` of integers in
  ``[0, MAX_INTEGER]`` and ``data_offsets`` ``[begin, end]`` whose span is the dtype's size times
  the number of elements;
* the spans tile the data exactly: they start at 0, follow one another without gap or overlap,
  and the last one ends at the end of the file.

Errors are :class:`SafetensorsHeaderError` with a message that does not name the file; each
caller adds the file and its own error type (``ShapeSourceError`` in :mod:`tensoradapt.analysis`,
``AdapterFileError`` in :mod:`tensoradapt.torch`, exit status 2 in the command line).
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._json import StrictJSONError, loads_strict
from ._validate import is_int

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "MAX_INTEGER",
    "MAX_JSON_DEPTH",
    "METADATA_KEY",
    "SafetensorsHeader",
    "SafetensorsHeaderError",
    "check_header",
    "read_header",
]

#: Largest header accepted, in bytes (the limit of the reference implementation, 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: Deepest JSON nesting accepted (a valid header nests 3 deep: header → entry → shape list).
MAX_JSON_DEPTH = 8
#: Largest shape dimension or data offset (an unsigned 64-bit integer, as in the reference).
#: Longer integers elsewhere in the header are refused by the strict reader's limit on the digits of
#: an integer (:data:`tensoradapt._json.MAX_INT_DIGITS`, 4300, the interpreter's default limit).
MAX_INTEGER = 2**64 - 1
#: The header key of the free-form string → string metadata.
METADATA_KEY = "__metadata__"
#: Bits per element of every dtype the reference implementation knows.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "U16": 16, "I16": 16, "F16": 16, "BF16": 16,
    "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64,
}

_LENGTH = struct.Struct("<Q")
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})  # what every tensor entry has (int checks: type is int,
# which JSON gives for integers and never for true/false)


class SafetensorsHeaderError(ValueError):
    """The file is not a well-formed safetensors file (the message says what is wrong)."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header.

    Attributes
    ----------
    header : dict
        The parsed JSON: tensor entries ``{"dtype", "shape", "data_offsets"}`` by name, and
        ``__metadata__`` when the file has it.
    data_start : int
        Byte position of the data in the file (``8 + header length``); a tensor's bytes are
        ``data_start + begin`` to ``data_start + end`` of its ``data_offsets``.
    file_size : int
    """

    header: dict[str, Any]
    data_start: int
    file_size: int

    @property
    def metadata(self) -> dict[str, str]:
        """``__metadata__`` (empty when the file has none)."""
        return dict(self.header.get(METADATA_KEY) or {})

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        """The tensor entries in storage order (ascending data offset)."""
        entries = [(name, e) for name, e in self.header.items() if name != METADATA_KEY]
        return dict(sorted(entries, key=lambda item: (item[1]["data_offsets"][0], item[0])))

    def read_bytes(self, path: str | os.PathLike[str], name: str) -> bytes:
        """The raw bytes of tensor ``name`` (little-endian, row-major) from the file at ``path``."""
        begin, end = self.header[name]["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(self.data_start + begin)
            return fh.read(end - begin)


def _parse(raw: bytes) -> Any:
    """The header JSON, by the one strict reader (:func:`tensoradapt._json.loads_strict`): at most
    :data:`MAX_JSON_DEPTH` deep (checked before parsing), integers only, no repeated key."""
    try:
        return loads_strict(raw, max_depth=MAX_JSON_DEPTH, allow_floats=False)
    except StrictJSONError as error:
        limit = " (MAX_JSON_DEPTH)" if error.kind == "depth" else ""
        tail = "; shapes and offsets are integers" if error.kind == "float" else ""
        raise SafetensorsHeaderError(f"the header {error}{limit}{tail}") from None


def check_header(header: Any, data_size: int) -> dict[str, Any]:
    """Check a parsed header against ``data_size`` bytes of data; return it (see the module doc)."""
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"the header must be a JSON object, got {type(header).__name__}")
    spans = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            if not isinstance(entry, Mapping):
                raise SafetensorsHeaderError(f"{METADATA_KEY} must be a JSON object, got {type(entry).__name__}")
            bad = next(((k, v) for k, v in entry.items() if not isinstance(v, str)), None)
            if bad is not None:
                raise SafetensorsHeaderError(f"{METADATA_KEY} must map strings to strings, but {bad[0]!r:.60} "
                                             f"has a {type(bad[1]).__name__}")
            continue
        if not isinstance(entry, dict) or not _FIELDS <= entry.keys():
            raise SafetensorsHeaderError(f"tensor {name!r} needs 'dtype', 'shape' and 'data_offsets', "
                                         f"got {entry!r:.80}")
        shape, offsets, dtype = entry["shape"], entry["data_offsets"], entry["dtype"]
        if not isinstance(shape, list) or not all(is_int(d) and 0 <= d <= MAX_INTEGER for d in shape):
            raise SafetensorsHeaderError(f"tensor {name!r} has shape {shape!r:.80}; a shape is a list of ints >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= min(data_size, MAX_INTEGER)):
            raise SafetensorsHeaderError(f"tensor {name!r} has data_offsets {offsets!r:.80}, outside the "
                                         f"{data_size} data bytes")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise SafetensorsHeaderError(f"tensor {name!r} has dtype {dtype!r:.40}; known dtypes are "
                                         f"{', '.join(DTYPE_BITS)}")
        bits = DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8 or offsets[1] - offsets[0] != bits // 8:
            raise SafetensorsHeaderError(f"tensor {name!r} ({dtype}, shape {shape}) needs {bits / 8:g} bytes but "
                                         f"data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0  # the format packs the tensors' bytes back to back: no overlap, no gap
    for start, stop, name in sorted(spans):
        if start != end:
            raise SafetensorsHeaderError(f"tensor {name!r} starts at byte {start} of the data, expected {end} "
                                         "(overlapping or non-contiguous data_offsets)")
        end = stop
    if end != data_size:
        raise SafetensorsHeaderError(f"the tensors cover {end} of the {data_size} data bytes (trailing bytes "
                                     "after the last tensor: truncated or not a safetensors file)")
    return header


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at ``path`` (never its data).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist (other ``OSError`` when it cannot be read).
    SafetensorsHeaderError
        If the file is too short, the header length exceeds the file or :data:`MAX_HEADER_BYTES`,
        the header is not a JSON object within the limits, or an entry is malformed (see the
        module documentation); the message does not name the file.

    Examples
    --------
    >>> import json, os, struct, tempfile
    >>> text = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    >>> with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as fh:
    ...     _ = fh.write(struct.pack("<Q", len(text)) + text + bytes(8))
    >>> info = read_header(fh.name)
    >>> info.tensors["w"]["shape"], info.data_start == 8 + len(text)
    ([2], True)
    >>> os.unlink(fh.name)
    """
    info = os.stat(path)  # FileNotFoundError for a missing file
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device never end
        raise SafetensorsHeaderError("not a regular file (a safetensors file is read only from a regular file)")
    size = info.st_size
    if size < _LENGTH.size:
        raise SafetensorsHeaderError(f"not a safetensors file ({size} bytes, fewer than the 8-byte header length)")
    with open(path, "rb") as fh:
        (length,) = _LENGTH.unpack(fh.read(_LENGTH.size))
        if length > size - _LENGTH.size:
            raise SafetensorsHeaderError(f"header length {length} exceeds the {size - _LENGTH.size} bytes after "
                                         "it (not a safetensors file, or truncated)")
        if length > MAX_HEADER_BYTES:
            raise SafetensorsHeaderError(f"header length {length} exceeds the limit of {MAX_HEADER_BYTES:,} bytes "
                                         "(MAX_HEADER_BYTES)")
        raw = fh.read(length)
    data_start = _LENGTH.size + length
    header = check_header(_parse(raw), size - data_start)
    return SafetensorsHeader(header, data_start, size)
