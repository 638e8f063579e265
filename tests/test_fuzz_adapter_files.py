"""Fuzz harness for adapter files: byte-level mutations of valid files through
``tensoradapt.torch.read_metadata`` and ``tensoradapt.torch.load`` (docs/reliability.md).

Mutations: truncation at any length, bit flips in the 8-byte length and the JSON header, and
JSON edits of every metadata field (each field, nested ones included, replaced by a value of the
wrong type or magnitude, by non-standard JSON such as ``Infinity`` or a 5000-digit integer, by
1000-deep nesting, or deleted).  Property: only ``AdapterFileError`` (naming the file),
``FileNotFoundError`` or ``PermissionError`` come out, within a time bound; a failed load leaves
the model bit-identical (same state, same modules, no adapter attribute).

The fixes behind this contract belong to the adapter layer (bindings/torch/files/ and the
adapters' load checks).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import tensoradapt.torch as tat  # noqa: E402
from tensoradapt import presets  # noqa: E402
from tensoradapt.glora.config import GLoRAConfig  # noqa: E402
from tensoradapt.testing import FuzzLedger, run_bounded  # noqa: E402

DOCUMENTED = (tat.AdapterFileError, FileNotFoundError, PermissionError)
SECONDS = 10.0  # per call, generous for a noisy machine (a call takes milliseconds)
WALL_SECONDS = 120.0  # wall clock: only catches a hang (the CPU bound is the real one)
EXAMPLES = 60
LEDGER = FuzzLedger()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _valid_file(kind: str, folder: Path) -> Path:
    model = _model()
    config = presets.lorta(3, 2) if kind == "superlora" else GLoRAConfig(rank=2)
    adapter = tat.attach(model, config, ["0", "2"])
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.1)
    return Path(adapter.save(folder / f"{kind}.safetensors"))


def _split(raw: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(header_text: str, data: bytes) -> bytes:
    blob = header_text.encode("utf-8")
    return struct.pack("<Q", len(blob)) + blob + data


# the valid files, read once at collection: their bytes and the paths of every metadata field
_ORIGINALS: dict[str, bytes] = {}
with tempfile.TemporaryDirectory() as _folder:
    for _kind in ("superlora", "glora"):
        _ORIGINALS[_kind] = _valid_file(_kind, Path(_folder)).read_bytes()


def _metadata(kind: str) -> dict:
    header, _ = _split(_ORIGINALS[kind])
    return json.loads(header["__metadata__"]["tensoradapt"])


def _field_paths(value, prefix=()) -> list[tuple]:
    """Every field path of the metadata: keys of objects and the first entry of lists, nested."""
    out = []
    if isinstance(value, dict):
        for key, child in value.items():
            out.append((*prefix, key))
            out += _field_paths(child, (*prefix, key))
    elif isinstance(value, list) and value:
        out.append((*prefix, 0))
        out += _field_paths(value[0], (*prefix, 0))
    return out


_DELETE = object()
#: Raw JSON texts a field is replaced by (the first ones run by default, all with -m slow).
HOSTILE = {
    "null": "null", "true": "true", "float": "1.5", "string no": '"no"', "digits5000": "9" * 5000,
    "deep1000": "[" * 1000 + "]" * 1000, "delete": _DELETE,
    "Infinity": "Infinity", "NaN": "NaN", "1e999": "1e999", "minus1": "-1", "zero": "0", "string 1": '"1"',
    "empty string": '""', "list": "[]", "object": "{}", "deep obj": '{"a":' * 1000 + "1" + "}" * 1000,
    "huge list": "[" + ",".join(["1"] * 100000) + "]", "2**64": str(2**64), "1.0": "1.0",
}
DEFAULT_HOSTILE = ("null", "true", "float", "string no", "digits5000", "deep1000", "delete")


def _edit(kind: str, path: tuple, text) -> bytes:
    """The valid file of ``kind`` with the metadata field at ``path`` replaced by the raw JSON ``text``."""
    meta = _metadata(kind)
    marker = "\u0000HOSTILE\u0000"
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if text is _DELETE:
        if isinstance(parent, list):
            del parent[path[-1]]
        else:
            del parent[path[-1]]
        meta_text = json.dumps(meta)
    else:
        parent[path[-1]] = marker
        meta_text = json.dumps(meta).replace(json.dumps(marker), text)
    header, data = _split(_ORIGINALS[kind])
    header["__metadata__"]["tensoradapt"] = meta_text
    return _join(json.dumps(header), data)


def _state(model: nn.Module) -> list[tuple[str, bytes]]:
    return [(k, v.detach().cpu().numpy().tobytes()) for k, v in model.state_dict().items()]


def _modules(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def _check_file(surface: str, path: Path) -> None:
    """read_metadata and load of ``path``: documented exceptions only, in time, model untouched."""
    outcome = run_bounded(lambda: tat.read_metadata(path), trace_memory=False)
    LEDGER.record(f"{surface}: read_metadata", outcome)
    _judge("read_metadata", path, outcome)
    model = _model()
    before, modules = _state(model), _modules(model)
    outcome = run_bounded(lambda: tat.load(model, path), trace_memory=False)
    LEDGER.record(f"{surface}: load", outcome)
    _judge("load", path, outcome)
    if outcome.error is not None:
        assert _state(model) == before, f"a failed load changed the model's state ({outcome.error})"
        assert _modules(model) == modules, "a failed load changed the model's modules"
        assert not hasattr(model, "tensoradapt"), "a failed load left an adapter attribute"


def _judge(what: str, path: Path, outcome) -> None:
    error = outcome.error
    if error is not None:
        if not isinstance(error, DOCUMENTED):
            raise AssertionError(f"{what}: undocumented {type(error).__name__}: {str(error)[:300]}") from error
        if isinstance(error, tat.AdapterFileError):
            assert path.name in str(error), f"{what}: the message does not name the file: {str(error)[:300]}"
    assert outcome.cpu_seconds < SECONDS, f"{what} took {outcome.cpu_seconds:.1f} s of CPU"
    assert outcome.seconds < WALL_SECONDS, f"{what} took {outcome.seconds:.1f} s"


# ------------------------------------------------------------------------------ JSON edits of every field
def _edit_cases(values) -> list:
    cases = []
    for kind in ("superlora", "glora"):
        for path in _field_paths(_metadata(kind)):
            for name in values:
                case = f"{kind}-{'.'.join(map(str, path))}-{name}"
                cases.append(pytest.param(kind, path, name, id=case))
    return cases


def _run_edit(tmp_path: Path, kind: str, path: tuple, name: str) -> None:
    file = tmp_path / f"{kind}.safetensors"
    file.write_bytes(_edit(kind, path, HOSTILE[name]))
    _check_file("json edit", file)


@pytest.mark.parametrize(("kind", "path", "name"), _edit_cases(DEFAULT_HOSTILE))
def test_metadata_field_edit(tmp_path, kind, path, name):
    _run_edit(tmp_path, kind, path, name)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "path", "name"), _edit_cases([v for v in HOSTILE if v not in DEFAULT_HOSTILE]))
def test_metadata_field_edit_slow(tmp_path, kind, path, name):
    _run_edit(tmp_path, kind, path, name)


# ------------------------------------------------------------------------------ truncation and bit flips
_COMMON = {"deadline": None, "database": None, "print_blob": True,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large]}


def _truncated(tmp_path: Path, kind: str, fraction: float) -> None:
    raw = _ORIGINALS[kind]
    file = tmp_path / f"{kind}.safetensors"
    file.write_bytes(raw[: int(fraction * (len(raw) - 1))])
    _check_file("truncation", file)


def _flipped(tmp_path: Path, kind: str, flips: list[tuple[float, int]]) -> None:
    raw = bytearray(_ORIGINALS[kind])
    (length,) = struct.unpack("<Q", bytes(raw[:8]))
    for where, bit in flips:  # in the length or the header (the data is the tensors' own business)
        raw[int(where * (8 + length - 1))] ^= 1 << bit
    file = tmp_path / f"{kind}.safetensors"
    file.write_bytes(bytes(raw))
    _check_file("bit flip", file)


_KIND = st.sampled_from(["superlora", "glora"])
_FLIPS = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=4)


@settings(max_examples=EXAMPLES, derandomize=True, **_COMMON)
@given(kind=_KIND, fraction=st.floats(0, 1))
def test_truncated_file(tmp_path, kind, fraction):
    _truncated(tmp_path, kind, fraction)


@settings(max_examples=EXAMPLES * 2, derandomize=True, **_COMMON)
@given(kind=_KIND, flips=_FLIPS)
def test_header_bit_flips(tmp_path, kind, flips):
    _flipped(tmp_path, kind, flips)


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 10, derandomize=False, **_COMMON)
@given(kind=_KIND, fraction=st.floats(0, 1))
def test_truncated_file_slow(tmp_path, kind, fraction):
    _truncated(tmp_path, kind, fraction)


@pytest.mark.slow
@settings(max_examples=EXAMPLES * 20, derandomize=False, **_COMMON)
@given(kind=_KIND, flips=_FLIPS)
def test_header_bit_flips_slow(tmp_path, kind, flips):
    _flipped(tmp_path, kind, flips)


# ------------------------------------------------------------------------------ files that are not files
def test_missing_fifo_and_folder(tmp_path):
    import os

    _check_file("special", tmp_path / "missing.safetensors")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    _check_file("special", fifo)  # must not block: only regular files are read
    _check_file("special", tmp_path)


def test_stale_temporary_file_is_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".superlora.safetensors.abc123.tmp"
    stale.write_bytes(b"left by a killed save")
    _valid_file("superlora", tmp_path)
    assert not stale.exists()


def teardown_module() -> None:
    LEDGER.write("adapter_files")
