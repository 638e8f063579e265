"""tensoradapt.analysis: geometry (dE, dL, dR, φ), shape sources and parameter tables."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensoradapt import count_params, presets
from tensoradapt.analysis import (
    ShapeSourceError,
    aggregate_by_kind,
    amplification,
    budget_sweep,
    compare,
    compare_pair,
    count_table,
    format_budget_sweep,
    format_count_table,
    infer_kind,
    parse_preset,
    parse_shapes,
    phi_grid,
    read_safetensors_header,
    shapes_from_json,
    shapes_from_model,
    shapes_from_safetensors,
    subspace_similarity,
    top_singular,
)


def _random(rng: np.random.Generator, o: int, n: int) -> np.ndarray:
    return rng.standard_normal((o, n))


def _direct(P: np.ndarray, Q: np.ndarray, k: int) -> tuple[float, float, float]:
    """dE, dL, dR straight from numpy.linalg.svd (the definition, docs/math.md §8.2)."""
    up, _, vpt = np.linalg.svd(P)
    uq, _, vqt = np.linalg.svd(Q)
    de = np.linalg.norm(P - Q) / np.linalg.norm(Q)
    dl = np.linalg.norm(up[:, :k].T @ uq[:, :k]) ** 2 / k
    dr = np.linalg.norm(vpt[:k] @ vqt[:k].T) ** 2 / k
    return float(de), float(dl), float(dr)


# ------------------------------------------------------------------------------ geometry
def test_identical_updates(backend):
    rng = np.random.default_rng(0)
    Q = _random(rng, 12, 9)
    rec = compare_pair(backend(Q), backend(Q), name="layer.0.query.weight")
    assert rec.dE == 0.0 and rec.dE_abs == 0.0
    assert rec.dL == pytest.approx(1.0, abs=1e-12) and rec.dR == pytest.approx(1.0, abs=1e-12)
    assert rec.k_eff == 5 and rec.kind == "query" and rec.shape == (12, 9)


def test_orthogonal_top_subspaces_give_zero():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    P = u[:, :5] @ np.diag(s) @ v[:, :5].T
    Q = u[:, 5:10] @ np.diag(s) @ v[:, 5:10].T
    rec = compare_pair(P, Q)
    assert rec.dL == pytest.approx(0.0, abs=1e-12) and rec.dR == pytest.approx(0.0, abs=1e-12)
    assert rec.dE == pytest.approx(math.sqrt(2.0))  # orthogonal: ‖P − Q‖² = ‖P‖² + ‖Q‖²
    assert np.allclose(phi_grid(P, Q, 5, 5, "left"), 0.0, atol=1e-12)


def test_against_direct_numpy(backend):
    rng = np.random.default_rng(2)
    for o, n, k in [(10, 7, 5), (6, 9, 3), (30, 30, 1)]:
        P, Q = _random(rng, o, n), _random(rng, o, n)
        rec = compare_pair(backend(P), backend(Q), k=k)
        de, dl, dr = _direct(P, Q, k)
        assert rec.dE == pytest.approx(de, rel=1e-10)
        assert rec.dL == pytest.approx(dl, rel=1e-9) and rec.dR == pytest.approx(dr, rel=1e-9)
        assert rec.dE_abs == pytest.approx(np.linalg.norm(P - Q), rel=1e-10)


def test_phi_grid_against_definition():
    rng = np.random.default_rng(3)
    P, Q = _random(rng, 15, 11), _random(rng, 15, 11)
    grid = phi_grid(P, Q, 4, 6, side="right")
    _, _, vp = np.linalg.svd(P)
    _, _, vq = np.linalg.svd(Q)
    for i in range(1, 5):
        for j in range(1, 7):
            expected = np.linalg.norm(vp[:i] @ vq[:j].T) ** 2 / min(i, j)
            assert grid[i - 1, j - 1] == pytest.approx(expected, rel=1e-9, abs=1e-14)
    assert subspace_similarity(P, Q, 3, 5) == pytest.approx(grid[2, 4])
    assert np.all((grid >= 0) & (grid <= 1))
    # nested subspaces: φ(i, j) = 1 when one top subspace contains the other
    assert np.allclose(np.diag(phi_grid(P, P, 4, 4, side="left")), 1.0)
    assert np.allclose(phi_grid(P, P, 3, 5, side="left"), 1.0)


@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3) | st.floats(-1e3, -1e-3),
       o=st.integers(6, 14), n=st.integers(6, 14), k=st.integers(1, 5), flip=st.booleans())
def test_invariance_to_sign_and_scale(seed, scale, o, n, k, flip):
    rng = np.random.default_rng(seed)
    P, Q = _random(rng, o, n), _random(rng, o, n)
    base = compare_pair(P, Q, k=k)
    moved = compare_pair(scale * P, -Q if flip else Q, k=k)
    assert moved.dL == pytest.approx(base.dL, abs=1e-8)
    assert moved.dR == pytest.approx(base.dR, abs=1e-8)
    assert moved.k_eff == base.k_eff
    grid = phi_grid(P, Q, k, k)
    assert np.allclose(phi_grid(scale * P, -Q if flip else Q, k, k), grid, atol=1e-8)
    # the symmetric statement: comparing Q with P gives the transposed grid
    assert np.allclose(phi_grid(Q, P, k, k), grid.T, atol=1e-10)


def test_rank_deficient_updates_use_k_eff():
    rng = np.random.default_rng(4)
    P = _random(rng, 10, 2) @ _random(rng, 2, 8)  # rank 2
    Q = _random(rng, 10, 8)
    rec = compare_pair(P, Q, k=5)
    assert rec.k_eff == 2
    up, _, _ = np.linalg.svd(P)
    uq, _, _ = np.linalg.svd(Q)
    assert rec.dL == pytest.approx(np.linalg.norm(up[:, :2].T @ uq[:, :2]) ** 2 / 2, rel=1e-9)
    zero = compare_pair(np.zeros((4, 4)), np.eye(4))
    assert zero.k_eff == 0 and math.isnan(zero.dL) and zero.dE == 1.0
    both = compare_pair(np.zeros((3, 3)), np.zeros((3, 3)))
    assert both.dE == 0.0 and math.isnan(both.dR)
    assert compare_pair(np.eye(3), np.zeros((3, 3))).dE == math.inf


def test_paired_cosines():
    rng = np.random.default_rng(5)
    P, Q = _random(rng, 9, 7), _random(rng, 9, 7)
    rec = compare_pair(P, Q, k=3, paired=True)
    up, _, vpt = np.linalg.svd(P)
    uq, _, vqt = np.linalg.svd(Q)
    assert rec.dL == pytest.approx(np.mean(np.abs(np.sum(up[:, :3] * uq[:, :3], axis=0))), rel=1e-9)
    assert rec.dR == pytest.approx(np.mean(np.abs(np.sum(vpt[:3] * vqt[:3], axis=1))), rel=1e-9)
    assert rec.paired and compare_pair(-P, P, paired=True).dL == pytest.approx(1.0)


def test_compare_and_aggregate_by_kind():
    rng = np.random.default_rng(6)
    names = [f"encoder.layer.{i}.attention.self.{kind}.weight" for i in range(3) for kind in ("query", "value")]
    Q = [_random(rng, 8, 6) for _ in names]
    P = [q + 0.1 * _random(rng, 8, 6) for q in Q]
    records = compare(P, Q, names=names, k=4)
    assert [r.kind for r in records] == ["query", "value"] * 3
    summary = aggregate_by_kind(records)
    assert list(summary) == ["query", "value"]
    assert summary["query"].count == 3
    assert summary["value"].dE == pytest.approx(np.mean([r.dE for r in records if r.kind == "value"]))
    assert summary["query"].dL == pytest.approx(np.mean([r.dL for r in records if r.kind == "query"]))
    kinds = compare(P, Q, kinds=["a", "b"] * 3)
    assert [r.kind for r in kinds][:2] == ["a", "b"] and kinds[0].name == "0"
    seen = []
    compare(P, Q, progress=lambda items: (seen.append(i) or i for i in items))
    assert seen == list(range(6))
    assert json.dumps(records[0].as_dict())


def test_conv_weights_are_flattened_and_svds_matches_full():
    rng = np.random.default_rng(7)
    P, Q = rng.standard_normal((12, 3, 2, 2)), rng.standard_normal((12, 3, 2, 2))
    rec = compare_pair(P, Q, k=3)
    flat = compare_pair(P.reshape(12, 12), Q.reshape(12, 12), k=3)
    assert rec.dL == pytest.approx(flat.dL) and rec.shape == (12, 12)
    A = rng.standard_normal((60, 40))
    full = top_singular(A, 4, method="full")
    arpack = top_singular(A, 4, method="svds")
    assert np.allclose(full[1], arpack[1])
    assert np.allclose(np.abs(full[0].T @ arpack[0]), np.eye(4), atol=1e-8)


def test_amplification():
    rng = np.random.default_rng(8)
    W = rng.standard_normal((10, 8))
    delta = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 8))
    projected, factor = amplification(delta, W, 2)
    u, _, vt = np.linalg.svd(delta)
    expected = np.linalg.norm(u[:, :2].T @ W @ vt[:2].T)
    assert projected == pytest.approx(expected) and factor == pytest.approx(np.linalg.norm(delta) / expected)


def test_infer_kind():
    assert infer_kind("model.layers.0.self_attn.q_proj.weight") == "q_proj"
    assert infer_kind("transformer.h.11.attn.c_attn.weight") == "c_attn"
    assert infer_kind("blocks.3.attn.qkv.lora_A.default.weight") == "qkv"
    assert infer_kind("query") == "query"


def test_geometry_errors():
    with pytest.raises(ValueError, match="same shape"):
        compare_pair(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        compare_pair(np.ones(3), np.ones(3))
    with pytest.raises(TypeError, match="real floating"):
        compare_pair(np.ones((3, 3), dtype=np.int64), np.ones((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="same length"):
        compare([np.ones((2, 2))], [])
    with pytest.raises(ValueError, match="side must be"):
        phi_grid(np.eye(3), np.eye(3), 2, 2, side="up")
    with pytest.raises(ValueError, match="k must be >= 1"):
        compare_pair(np.eye(3), np.eye(3), k=0)
    with pytest.raises(ValueError, match="method must be"):
        top_singular(np.eye(3), 2, method="qr")
    with pytest.raises(ValueError, match="same number of columns"):
        phi_grid(np.ones((3, 4)), np.ones((3, 5)), 1, 1)


# ------------------------------------------------------------------------------ shapes
def _write_safetensors(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_shapes_from_safetensors_reads_the_header_only(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"b.query.weight": np.zeros((4, 3), np.float32), "a.value.weight": np.zeros((4, 3), np.float32),
               "a.bias": np.zeros(4, np.float32)}, str(path), metadata={"format": "np"})
    targets = shapes_from_safetensors(path)
    assert sorted((t.name, t.shape, t.dtype) for t in targets) == [
        ("a.value.weight", (4, 3), "F32"), ("b.query.weight", (4, 3), "F32")]
    assert [t.name for t in shapes_from_safetensors(path, min_ndim=1, pattern="bias")] == ["a.bias"]
    assert "__metadata__" in read_safetensors_header(path)
    # a header that promises 2 GB of data is read without touching (or needing) the data
    big = tmp_path / "big.safetensors"
    _write_safetensors(big, {"w": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, 0]}})
    with pytest.raises(ShapeSourceError, match="data_offsets"):
        shapes_from_safetensors(big)


@pytest.mark.parametrize(("content", "message"), [
    (b"abc", "fewer than the 8-byte"),
    (struct.pack("<Q", 1000) + b"{}", "exceeds"),
    (struct.pack("<Q", 3) + b"[1]", "JSON object"),
    (struct.pack("<Q", 4) + b"{no}", "not valid UTF-8 JSON"),
])
def test_malformed_safetensors(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ShapeSourceError, match=message):
        shapes_from_safetensors(path)


def test_malformed_safetensors_entries(tmp_path):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, {"w": {"dtype": "F32", "shape": [2, "x"], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ShapeSourceError, match="list of ints"):
        shapes_from_safetensors(path)
    _write_safetensors(path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(ShapeSourceError, match="needs 16 bytes"):
        shapes_from_safetensors(path)
    _write_safetensors(path, {"w": {"shape": [2]}})
    with pytest.raises(ShapeSourceError, match="needs 'dtype'"):
        shapes_from_safetensors(path)
    with pytest.raises(FileNotFoundError):
        shapes_from_safetensors(tmp_path / "missing.safetensors")


def test_shapes_from_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"q": [768, 768], "v": [768, 768]}))
    assert [(t.name, t.shape) for t in shapes_from_json(path)] == [("q", (768, 768)), ("v", (768, 768))]
    assert len(shapes_from_json({"targets": [{"shape": [2, 2], "count": 3}]})) == 3
    assert [t.shape for t in parse_shapes(str(path))] == [(768, 768)] * 2
    for bad, message in [([[2, 0]], "positive integers"), ([{"name": "x"}], "needs a 'shape'"), (3, "expected a list"),
                         ([], "no target shapes"), ([{"shape": [2], "count": 0}], "'count'")]:
        with pytest.raises(ShapeSourceError, match=message):
            shapes_from_json(bad)
    path.write_text("{oops")
    with pytest.raises(ShapeSourceError, match="not valid JSON"):
        shapes_from_json(path)


def test_parse_shapes():
    assert [t.shape for t in parse_shapes("24x768x768")] == [(768, 768)] * 24
    assert [t.shape for t in parse_shapes("768x768, 768X3072,2x4x5")] == [(768, 768), (768, 3072), (4, 5), (4, 5)]
    for bad in ("", "768", "768x", "0x5", "2x3x4x5", "axb", "768x768,,"):
        with pytest.raises(ShapeSourceError, match="malformed shape"):
            parse_shapes(bad)
    with pytest.raises(FileNotFoundError):
        parse_shapes("missing.safetensors")


def test_shapes_from_model():
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(8, 6)
            self.value = torch.nn.Linear(8, 6)
            self.norm = torch.nn.LayerNorm(6)

    model = torch.nn.Sequential(Block(), Block())
    targets = shapes_from_model(model, ["query", "value"])
    assert [(t.name, t.shape) for t in targets] == [
        ("0.query.weight", (6, 8)), ("0.value.weight", (6, 8)), ("1.query.weight", (6, 8)), ("1.value.weight", (6, 8))]
    assert len(shapes_from_model(model)) == 4  # the LayerNorm weight is 1-D
    assert [t.name for t in shapes_from_model(model, r"1\.value")] == ["1.value.weight"]
    with pytest.raises(ShapeSourceError, match="no module"):
        shapes_from_model(model, ["key"])
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        shapes_from_model(object())
    with pytest.raises(ShapeSourceError, match="not a valid regular expression"):
        shapes_from_model(model, "(")
    # the (o, n) matrices attach() adapts: convolutions as (o, i/groups · Π k); 1-D weights as stored
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.LayerNorm(5))
    assert [(t.name, t.shape) for t in shapes_from_model(conv, min_ndim=1)] == [("0.weight", (6, 36)),
                                                                                 ("1.weight", (5,))]
    assert [t.name for t in shapes_from_model(model, lambda name, module: name.endswith("0.value"))] == [
        "0.value.weight"]


def test_shapes_from_model_without_the_entry_point(monkeypatch):
    """Stale install metadata (no ``tensoradapt.model_shapes`` entry point): the torch binding's
    reader is found by its module name; an ImportError, naming the fix, only when that fails."""
    torch = pytest.importorskip("torch")
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [])
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert [(t.name, t.shape) for t in shapes_from_model(model)] == [("0.weight", (2, 3))]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        shapes_from_model(object())
    monkeypatch.setitem(sys.modules, "tensoradapt.torch.targets", None)  # the binding does not import
    with pytest.raises(ImportError, match="reinstall tensoradapt"):
        shapes_from_model(model)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"none is installed \(pip install tensoradapt\[torch\]\)"):
        shapes_from_model(model)


def test_core_does_not_import_torch_tensorly_or_matplotlib():
    code = ("import sys, tensoradapt.analysis, tensoradapt.cli; "
            "bad = [m for m in ('torch', 'tensorly', 'matplotlib', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ tables
def test_count_table_matches_spec_vectors():
    shapes = [(768, 768)] * 24
    rows = count_table(shapes, ["lora", "lotr:rank=2", "lorta:order=3,groups=1", "dense"], ranks=[1, 8])
    counts = {r.label: r.params for r in rows}
    assert counts["lora(rank=1)"] == 36_864 and counts["lora(rank=8)"] == 294_912  # docs/math.md §4.1
    assert counts["lotr(rank=2)"] == 3_168
    assert counts["lorta(order=3, groups=1, rank=8)"] == 6_320
    assert counts["dense()"] == 14_155_776
    text = format_count_table(shapes, rows)
    assert "N = 14,155,776" in text and "294,912" in text
    labelled = count_table(shapes, {"mine": presets.lonkr(3, 1, 6)})
    assert labelled[0].params == 140 and labelled[0].groups == 1


def test_count_table_marks_inapplicable_configs():
    rows = count_table([(8, 8), (8, 4)], ["lotr:rank=2"])
    assert rows[0].params is None and "shape" in rows[0].note
    assert "n/a" in format_count_table([(8, 8), (8, 4)], rows)


def test_parse_preset_errors():
    with pytest.raises(ValueError, match="unknown preset 'loraa'"):
        parse_preset("loraa")
    with pytest.raises(ValueError, match="no argument 'depth'"):
        parse_preset("lora:depth=3")
    with pytest.raises(ValueError, match="key=value"):
        parse_preset("lora:8")
    with pytest.raises(ValueError, match="order"):
        parse_preset("lorta:order=0,rank=2")
    with pytest.raises(ValueError, match="needs order="):
        parse_preset("lorta")
    with pytest.raises(ValueError, match="'rank' twice"):
        parse_preset("lora:rank=2,rank=3")
    (label, config), = parse_preset("lotr:rank=2")  # S comes from the shapes when the plan is built
    assert label == "lotr(rank=2)" and count_params(config, [(4, 4)] * 5) == 5 * 4 + 8 * 2


def test_budget_sweep():
    shapes = [(768, 768)] * 24
    entries = budget_sweep(shapes, 40_000, ["lora", "lotr"], top=3)
    assert len(entries) == 3 and entries[-1].params == 36_864
    assert all(e.params <= 40_000 for e in entries)
    text = format_budget_sweep(shapes, entries, 40_000)
    assert "36,864" in text and "lotr" in text
    assert budget_sweep(shapes, 10, ["lora"]) == []


@pytest.mark.parametrize("magnitude", [1e-25, 1e20])
def test_distances_do_not_underflow_or_overflow_in_float32(magnitude) -> None:
    from tensoradapt.analysis import compare_pair

    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 5))
    p = q + 0.5 * rng.standard_normal((6, 5))
    expected = np.linalg.norm(p - q) / np.linalg.norm(q)
    record = compare_pair((magnitude * p).astype(np.float32), (magnitude * q).astype(np.float32))
    assert record.dE == pytest.approx(expected, rel=1e-5)
    assert np.isfinite(record.norm_P) and record.norm_P > 0
