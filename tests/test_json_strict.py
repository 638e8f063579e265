"""The one strict JSON reader (``tensoradapt._json``) and its callers.

Depth is counted on the characters before anything is parsed; repeated keys, NaN/Infinity, floats
where only integers are allowed and over-long integers are refused with one error type whose
message each caller wraps in its own error type and subject.
"""

from __future__ import annotations

import json
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensoradapt._json as strict
from tensoradapt import cli
from tensoradapt._json import MAX_INT_DIGITS, StrictJSONError, loads_strict, nesting_depth
from tensoradapt._safetensors import SafetensorsHeaderError, read_header
from tensoradapt.analysis.shapes import ShapeSourceError, shapes_from_json


def _depth(value) -> int:
    """The reference: 0 for a scalar, 1 + the deepest child for an array or object."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _refused(text, kind: str, **options) -> str:
    options.setdefault("max_depth", 8)
    with pytest.raises(StrictJSONError) as info:
        loads_strict(text, **options)
    assert info.value.kind == kind, (str(info.value), info.value.kind)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ---------------------------------------------------------------------------------- depth
@pytest.mark.parametrize(("text", "depth"), [
    ("7", 0), ('"[[["', 0), ("[]", 1), ("{}", 1), ('{"a": [1, {"b": []}]}', 4), ("[[], [[]], []]", 3),
    ('["[[[[", "{{{{", "]]]]"]', 1),          # brackets inside strings do not count
    ('["\\"[[[["]', 1),                        # an escaped quote does not end the string
    ('["\\\\", [[]]]', 3),                     # an escaped backslash does: the quote after it closes the string
    ('{"\\u005b\\"": [["\\\\\\"]"]]}', 3),     # escapes in keys, a backslash then an escaped quote
    ("[[[", 3), ("]]][", 0),                   # not JSON: the brackets outside strings, never negative
])
def test_nesting_depth(text, depth):
    assert nesting_depth(text) == depth == nesting_depth(text.encode("utf-8"))
    if text[:1] in "[{" and text.count("[") == text.count("]"):
        assert _depth(json.loads(text)) == depth


def _counting_accumulate(monkeypatch) -> list[int]:
    """Make :func:`nesting_depth`'s one Python-level pass (``itertools.accumulate`` over the
    brackets, or over their runs) count the items it consumes; returns the one-element counter.

    Everything else :func:`nesting_depth` does is a single ``bytes`` method or regular expression
    over the text, each linear by construction, so this count is the work whose growth the
    tests below bound, without a clock (a busy machine cannot change it)."""
    count = [0]
    real = strict.accumulate

    def counted(iterable, *args, **kwargs):
        def items():
            for item in iterable:
                count[0] += 1
                yield item

        return real(items(), *args, **kwargs)

    monkeypatch.setattr(strict, "accumulate", counted)
    return count


def _steps(count: list[int], text) -> int:
    count[0] = 0
    nesting_depth(text)
    return count[0]


def test_a_million_levels_are_refused_before_parsing(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("json.loads was called on text deeper than the limit")

    monkeypatch.setattr(strict, "json", types.SimpleNamespace(loads=never))
    count = _counting_accumulate(monkeypatch)
    for text in ("[" * 10**6 + "]" * 10**6, "[" * 10**6, '{"a":' * 10**6 + "1" + "}" * 10**6, b"[" * 10**6):
        count[0] = 0
        assert _refused(text, "depth", max_depth=16) == "nests deeper than 16 levels"
        assert 1 <= count[0] <= 4, count[0]  # deep nesting: one step per run of openers or closers


# texts of n levels or n brackets, in the shapes that take each path of nesting_depth, and their depth
_SHAPES = {
    "deep": (lambda n: "[" * n + "]" * n, lambda n: n),
    "deep object": (lambda n: '{"a":' * n + "1" + "}" * n, lambda n: n),
    "alternating": (lambda n: "[]" * n + "[" * 17, lambda n: 17),  # short runs: one step per bracket
    "strings": (lambda n: '["\\\\", "[[", ' * n + "[]" + "]" * n, lambda n: n + 1),  # escapes, brackets in strings
    "bytes": (lambda n: b"[{" * n + b"}]" * n, lambda n: 2 * n),
}


@pytest.mark.parametrize("shape", list(_SHAPES))
def test_the_depth_count_is_linear_in_the_text(monkeypatch, shape):
    """At most one Python-level step per character, and 10x the text takes at most 10x the steps."""
    count = _counting_accumulate(monkeypatch)
    make, depth = _SHAPES[shape]
    small, large = make(10**4), make(10**5)
    assert nesting_depth(small) == depth(10**4) and nesting_depth(large) == depth(10**5)
    if shape not in ("alternating", "bytes"):  # valid JSON: the reference agrees
        assert _depth(json.loads(make(50))) == depth(50)
    steps_small, steps_large = _steps(count, small), _steps(count, large)
    assert 1 <= steps_small <= len(small) and steps_large <= len(large), (steps_small, steps_large)
    assert steps_large <= 10 * steps_small, (steps_small, steps_large)
    if shape == "alternating":  # the per-bracket path: exactly one step per bracket
        assert (steps_small, steps_large) == (2 * 10**4 + 17, 2 * 10**5 + 17)
    with pytest.raises(StrictJSONError, match="nests deeper than 16 levels"):
        loads_strict(large, max_depth=16)


def test_the_depth_limit_is_inclusive():
    text = "[" * 5 + "]" * 5
    assert loads_strict(text, max_depth=5) == [[[[[]]]]]
    _refused(text, "depth", max_depth=4)
    assert loads_strict("3", max_depth=0) == 3
    _refused("[]", "depth", max_depth=0)
    assert loads_strict('["' + "[" * 1000 + '"]', max_depth=1) == ["[" * 1000]


# ---------------------------------------------------------------------------------- the other rules
def test_repeated_keys_are_refused_at_any_depth():
    assert "repeats the key 'b'" in _refused('{"a": {"b": 1, "c": 2, "b": 3}}', "key")
    assert "repeats the key 'a'" in _refused('[{"a": 1, "a": 1}]', "key")
    assert loads_strict('[{"a": 1}, {"a": 1}]', max_depth=2) == [{"a": 1}, {"a": 1}]


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(word):
    message = _refused(f'{{"x": [{word}]}}', "constant")
    assert "is not valid JSON" in message and repr(word) in message


def test_float_overflow_is_refused_and_finite_floats_are_kept():
    assert "overflows" in _refused("[1e999]", "constant")
    assert "overflows" in _refused("[-1e400]", "constant")
    assert loads_strict("[1.5, -2e-3, 1e308]", max_depth=1) == [1.5, -2e-3, 1e308]


@pytest.mark.parametrize("word", ["1.5", "1e3", "-0.0", "2E-2"])
def test_floats_are_refused_when_only_integers_are_allowed(word):
    message = _refused(f'{{"shape": [2, {word}]}}', "float", allow_floats=False)
    assert message == f"holds the number {word!r} where only integers are allowed"
    assert loads_strict('{"shape": [2, -3, 0]}', max_depth=2, allow_floats=False) == {"shape": [2, -3, 0]}


def test_integers_longer_than_the_limit_are_refused_without_converting_them(monkeypatch):
    assert loads_strict("[" + "9" * MAX_INT_DIGITS + "]", max_depth=1) == [int("9" * MAX_INT_DIGITS)]
    assert loads_strict("-" + "9" * MAX_INT_DIGITS, max_depth=0) < 0  # the sign is not a digit
    assert f"an integer of {MAX_INT_DIGITS + 1} digits" in _refused("[" + "9" * (MAX_INT_DIGITS + 1) + "]",
                                                                    "integer")
    converted: list[int] = []

    def counting_int(word, *args):
        converted.append(len(word))
        return int(word, *args)

    def loads(text, **hooks):  # the parser, with int() counted while it runs (the name the hooks look up)
        strict.int = counting_int
        try:
            return json.loads(text, **hooks)
        finally:
            del strict.int

    monkeypatch.setattr(strict, "json", types.SimpleNamespace(loads=loads))
    _refused("[" + "7" * 10**6 + "]", "integer")  # never converted: int() of it would take seconds
    assert converted == []
    assert loads_strict("[12, 345]", max_depth=1) == [12, 345] and converted == [2, 3]
    assert loads_strict("[123456]", max_depth=1, max_int_digits=6) == [123456]
    _refused("[1234567]", "integer", max_int_digits=6)


@pytest.mark.parametrize(("text", "phrase"), [
    ("{", "is not valid JSON (Expecting"), ("", "is not valid JSON"), ("[1,]", "is not valid JSON"),
    ("[1] [2]", "Extra data"), ("\ufeff[1]", "BOM"),
    (b"{no}", "is not valid UTF-8 JSON"), (b'["\xff"]', "is not valid UTF-8 JSON (byte 2 is not UTF-8)"),
])
def test_what_is_not_json(text, phrase):
    assert phrase in _refused(text, "syntax")


def test_bad_arguments_are_not_blamed_on_the_text():
    for bad in (-1, True, 2.0, "8"):
        with pytest.raises(ValueError, match="max_depth must be an integer >= 0"):
            loads_strict("[]", max_depth=bad)
    with pytest.raises(ValueError, match="max_int_digits"):
        loads_strict("[]", max_depth=1, max_int_digits=0)
    with pytest.raises(TypeError, match="str or bytes"):
        loads_strict(["[]"], max_depth=1)
    with pytest.raises(TypeError, match="as str or bytes"):
        nesting_depth(["[]"])
    assert nesting_depth(b'["\xc3\xa9[", [\xff]]') == 2  # bytes are read as UTF-8 (never decoded)


# ---------------------------------------------------------------------------------- properties
_keys = st.text(alphabet=st.sampled_from('ab[]{}"\\\n/é\u2028'), max_size=6)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('x[]{}"\\,:\t\u00e9\U0001f600'), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, ensure_ascii=st.booleans(), indent=st.sampled_from([None, 1]))
def test_depth_matches_the_recursive_definition_and_values_round_trip(value, ensure_ascii, indent):
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    depth = _depth(value)
    assert nesting_depth(text) == depth
    assert loads_strict(text, max_depth=depth) == value
    assert loads_strict(text.encode("utf-8"), max_depth=depth) == value
    if depth:
        with pytest.raises(StrictJSONError, match=f"nests deeper than {depth - 1} levels"):
            loads_strict(text, max_depth=depth - 1)


# ---------------------------------------------------------------------------------- the callers
def _safetensors_file(path, header: bytes) -> str:
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return str(path)


@pytest.mark.parametrize(("header", "message"), [
    (b"[" * 10**6, "the header nests deeper than 8 levels (MAX_JSON_DEPTH)"),
    (b'{"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 0]}}',
     "the header holds the number '2.5' where only integers are allowed; shapes and offsets are integers"),
    (b'{"a": {}, "a": {}}', "the header is not valid UTF-8 JSON (repeats the key 'a')"),
    (b"{no}", "the header is not valid UTF-8 JSON (Expecting"),
])
def test_the_safetensors_reader_wraps_the_reason(tmp_path, header, message):
    with pytest.raises(SafetensorsHeaderError) as info:
        read_header(_safetensors_file(tmp_path / "x.safetensors", header))
    assert str(info.value).startswith(message)


def test_a_shape_file_nesting_too_deep_is_refused_by_name(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"targets": ' + "[" * 17 + "]" * 17 + "}")
    with pytest.raises(ShapeSourceError, match=r"deep\.json: the file nests deeper than 16 levels$"):
        shapes_from_json(path)
    path.write_text('{"targets": [{"shape": [4, 4], "count": 2}], "targets": []}')
    with pytest.raises(ShapeSourceError, match="repeats the key 'targets'"):
        shapes_from_json(path)
    path.write_bytes(b'["\xff"]')
    with pytest.raises(ShapeSourceError, match=r"not UTF-8 text \(byte 2\)"):
        shapes_from_json(path)


def test_count_on_a_1e5_deep_json_file_exits_2_with_one_line(tmp_path, capfd):
    path = tmp_path / "deep.json"
    path.write_text("[" * 10**5 + "]" * 10**5)
    capfd.readouterr()
    code = cli.main(["count", str(path)])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "nests deeper than 16 levels" in err, err
    assert "RecursionError" not in err and "Traceback" not in err


def test_the_torch_readers_wrap_the_reason_with_their_subject(tmp_path):
    pytest.importorskip("torch")
    from tensoradapt.torch.files.layout import MAX_METADATA_DEPTH, AdapterFileError
    from tensoradapt.torch.files.read import parse_metadata
    from tensoradapt.torch.hf import holds_adapter

    deep = "[" * (MAX_METADATA_DEPTH + 1) + "]" * (MAX_METADATA_DEPTH + 1)
    with pytest.raises(AdapterFileError, match=r"^'f' is corrupted: its tensoradapt metadata nests deeper than 16 "):
        parse_metadata(deep, "'f'")
    with pytest.raises(AdapterFileError, match=r"^'c' is corrupted: its JSON is not valid JSON \(repeats the key 'r'"):
        parse_metadata('{"r": 1, "r": 2}', "'c'", what="JSON")
    assert parse_metadata(deep[1:-1], "'f'") == json.loads(deep[1:-1])
    # a folder whose adapter_config.json is a million levels deep is not an adapter folder (no RecursionError)
    (tmp_path / "adapter_config.json").write_text("[" * 10**6)
    assert holds_adapter(tmp_path) is False
    (tmp_path / "adapter_config.json").write_text('{"library": "tensoradapt"}')
    assert holds_adapter(tmp_path) is True
