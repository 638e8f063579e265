"""The one safetensors header reader (tensoradapt._safetensors) and its three users.

The users are the analysis shape sources (``shapes_from_safetensors``, ``read_safetensors_header``,
``tensoradapt count FILE``), ``tensoradapt compare`` and the torch adapter files
(``tensoradapt.torch.read_metadata`` / ``load``).  The drift tests check that each goes through
:func:`tensoradapt._safetensors.read_header` and its limits, and that no other module parses a
safetensors header on its own.
"""

from __future__ import annotations

import json
import pathlib
import re
import struct

import numpy as np
import pytest

from tensoradapt import _safetensors, cli
from tensoradapt._safetensors import SafetensorsHeaderError, read_header
from tensoradapt.analysis import ShapeSourceError, read_safetensors_header, shapes_from_safetensors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write(path, header, data: bytes = b"") -> pathlib.Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_reads_a_reference_file(tmp_path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"b": np.zeros((3, 2), np.float16), "a": np.ones(4, np.float64)}, str(path), metadata={"k": "v"})
    info = read_header(path)
    assert info.metadata == {"k": "v"} and info.file_size == path.stat().st_size
    assert {k: (e["dtype"], e["shape"]) for k, e in info.tensors.items()} == {"a": ("F64", [4]), "b": ("F16", [3, 2])}
    assert list(info.tensors) == sorted(info.tensors, key=lambda k: info.header[k]["data_offsets"][0])
    assert np.frombuffer(info.read_bytes(path, "a"), "<f8").tolist() == [1.0] * 4
    _write(path, {"w": _entry("F4", (4,), 0, 2), "v": _entry("F6_E2M3", (4,), 2, 5)}, bytes(5))  # sub-byte dtypes
    assert set(read_header(path).tensors) == {"w", "v"}
    _write(path, {}, b"")
    assert read_header(path).tensors == {} and read_header(path).metadata == {}


BAD = {
    "short": (b"abc", "fewer than the 8-byte"),
    "length past the file": (struct.pack("<Q", 1000) + b"{}", "header length 1000 exceeds"),
    "not an object": (struct.pack("<Q", 3) + b"[1]", "JSON object"),
    "not json": (struct.pack("<Q", 4) + b"{no}", "not valid UTF-8 JSON"),
    "not utf-8": (b'{"\xff": "x"}', "not valid UTF-8 JSON"),
    "deep": ({"w": {**_entry(), "x": [[[[[[[[[]]]]]]]]]}}, "nests deeper than 8"),
    "very deep": (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON|nests deeper"),
    "huge offset": ({"w": _entry(end=10**30)}, "outside"),
    "huge dimension": ({"w": _entry(shape=(2**64, 0), end=0)}, "list of ints"),
    "integer of 5000 digits": (b'{"w": {"x": ' + b"9" * 5000 + b"}}", "not valid UTF-8 JSON"),
    "float": ({"w": {**_entry(), "shape": [2.0]}}, "the number '2.0'"),
    "nan": (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "the number 'NaN'"),
    "duplicate key": (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {}}', "repeats the key"),
    "metadata not an object": ({"__metadata__": [1]}, "must be a JSON object"),
    "metadata value not a string": ({"__metadata__": {"a": 1}}, "strings to strings"),
    "missing fields": ({"w": {"shape": [2]}}, "needs 'dtype'"),
    "bad shape": ({"w": _entry(shape=(2, "x"))}, "list of ints"),
    "bool shape": ({"w": _entry(shape=(True,), end=4)}, "list of ints"),
    "negative offset": ({"w": _entry(begin=-8, end=0)}, "outside"),
    "offset past the data": ({"w": _entry(end=16)}, "outside the 8 data bytes"),
    "unknown dtype": ({"w": _entry(dtype="Q4")}, "unknown|known dtypes"),
    "byte size": ({"w": _entry(shape=(2, 2))}, "needs 16 bytes"),
    "half a byte": ({"w": _entry("F4", (3,), 0, 2)}, "needs 1.5 bytes"),
    "overlap": ({"a": _entry(end=8), "b": _entry(begin=4, end=12)}, "overlapping or non-contiguous"),
    "gap": ({"a": _entry(end=8), "b": _entry(begin=12, end=20)}, "overlapping or non-contiguous"),
    "trailing bytes": ({"a": _entry(end=4, shape=(1,))}, "cover 4 of the 8 data bytes"),
}
_DATA = {"overlap": 12, "gap": 20, "offset past the data": 8, "negative offset": 8, "trailing bytes": 8}


def _bad_file(tmp_path, case) -> pathlib.Path:
    content, _ = BAD[case]
    path = tmp_path / "bad.safetensors"
    if isinstance(content, bytes) and not content.startswith((b"{", b"[")):
        path.write_bytes(content)
        return path
    return _write(path, content, bytes(_DATA.get(case, 8)))


@pytest.mark.parametrize("case", BAD)
def test_malformed_headers(tmp_path, case) -> None:
    path = _bad_file(tmp_path, case)
    with pytest.raises(SafetensorsHeaderError, match=BAD[case][1]):
        read_header(path)
    with pytest.raises(ShapeSourceError, match=re.escape(str(path)) + ": "):
        shapes_from_safetensors(path)


# stricter than the reference: it keeps one of two repeated keys and ignores unknown entry fields however deep
@pytest.mark.parametrize("case", [c for c in BAD if c not in ("duplicate key", "deep")])
def test_the_reference_refuses_them_too(tmp_path, case) -> None:
    safe_open = pytest.importorskip("safetensors").safe_open
    path = _bad_file(tmp_path, case)
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        with safe_open(str(path), framework="numpy") as fh:
            for key in fh.keys():
                fh.get_tensor(key)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------ drift: one reader, one set of limits
def test_no_other_module_parses_a_header() -> None:
    reader = ROOT / "tensoradapt" / "_safetensors.py"
    sources = [p for folder in ("tensoradapt", "bindings") for p in (ROOT / folder).rglob("*.py") if p != reader]
    assert sources
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for needle in ('"<Q"', "'<Q'", "struct.unpack", "100_000_000", "1024 * 1024", "_MAX_HEADER"):
            assert needle not in text, f"{path.relative_to(ROOT)} has {needle!r}: use tensoradapt._safetensors"


@pytest.fixture
def files(tmp_path):
    """A plain safetensors file and a tensoradapt adapter file."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    import tensoradapt.torch as tat
    from tensoradapt import presets

    plain = tmp_path / "plain.safetensors"
    save_file({"layer.query.weight": np.eye(4, dtype=np.float32)}, str(plain))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapter = tat.attach(model, presets.lora(1), ["0"]).save(tmp_path / "adapter.safetensors")
    return {"plain": plain, "adapter": adapter, "model": lambda: torch.nn.Sequential(torch.nn.Linear(4, 4))}


def _users(files):
    """Every user of the reader: (label, call, error type or exit status on a refused header)."""
    import tensoradapt.torch as tat

    plain, adapter = str(files["plain"]), files["adapter"]
    return [
        ("shapes_from_safetensors", lambda: shapes_from_safetensors(plain), ShapeSourceError),
        ("read_safetensors_header", lambda: read_safetensors_header(plain), ShapeSourceError),
        ("cli count", lambda: cli.main(["count", plain, "--preset", "lora:rank=1"]), 2),
        ("cli compare", lambda: cli.main(["compare", plain, plain, "--no-plot", "--no-progress"]), 2),
        ("read_metadata", lambda: tat.read_metadata(adapter), tat.AdapterFileError),
        ("load", lambda: tat.load(files["model"](), adapter), tat.AdapterFileError),
    ]


def test_every_user_calls_the_one_reader(files, monkeypatch, capsys) -> None:
    seen = []
    original = _safetensors.read_header

    def spy(path):
        seen.append(pathlib.Path(path).name)
        return original(path)

    monkeypatch.setattr(_safetensors, "read_header", spy)
    for label, call, _ in _users(files):
        seen.clear()
        result = call()
        assert result != 2, (label, capsys.readouterr().err)
        assert seen, f"{label} did not read the header through tensoradapt._safetensors.read_header"


def test_every_user_has_the_same_limits(files, monkeypatch, capsys) -> None:
    """Lowering the one limit makes every user refuse the same files with the same reason."""
    monkeypatch.setattr(_safetensors, "MAX_HEADER_BYTES", 16)
    for label, call, expected in _users(files):
        if isinstance(expected, int):
            assert call() == expected, label
            assert "MAX_HEADER_BYTES" in capsys.readouterr().err, label
        else:
            with pytest.raises(expected, match="MAX_HEADER_BYTES"):
                call()
    monkeypatch.setattr(_safetensors, "MAX_HEADER_BYTES", 100_000_000)
    monkeypatch.setattr(_safetensors, "MAX_JSON_DEPTH", 1)  # a valid header nests 3 deep
    for label, call, expected in _users(files):
        if isinstance(expected, int):
            assert call() == expected, label
            assert "nests deeper than 1" in capsys.readouterr().err, label
        else:
            with pytest.raises(expected, match="nests deeper than 1"):
                call()


def test_adapter_errors_name_the_file(tmp_path) -> None:
    pytest.importorskip("torch")
    import tensoradapt.torch as tat

    path = _write(tmp_path / "a.safetensors", {"w": _entry(end=16)}, bytes(8))
    with pytest.raises(tat.AdapterFileError, match=r"'.*a\.safetensors' is corrupted or not a safetensors file: "
                                                   r"tensor 'w' has data_offsets"):
        tat.read_metadata(path)
    path = _write(tmp_path / "m.safetensors", {"__metadata__": {"tensoradapt": 3}})
    with pytest.raises(tat.AdapterFileError, match=r"corrupted.*strings to strings"):
        tat.read_metadata(path)
