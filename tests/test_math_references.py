"""Citations of the mathematics point into the repository's own ``docs/math.md``.

* No file of the repository cites the external research spec ("spec §…", "spec Part …"): that
  file is not part of the repository, so such a citation cannot be followed.
* Every citation ``docs/math.md §X.Y`` or ``docs/math.md DN`` names a numbered heading or a
  decision that exists in ``docs/math.md``.
* The ViT-Base worked counts stated in ``docs/math.md`` §4.1 agree with ``count_params``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
SCANNED = ("tensoradapt", "bindings", "demo", "tests", "benchmarks", "examples", "docs")
SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".cfg", ".ini", ".json", ".yaml", ".yml", ".sh"}

# "spec §3.4", "spec Part II §7.2", "Spec Part I item 14", "spec's §5" (also across a line break)
_SPEC_CITATION = re.compile(r"\bspec(?:'s)?\s+(?:§|Part\s+I)", re.IGNORECASE)
# one reference: §3, §3.4, §3.7–3.8 (a range), or a decision D10
_REF = r"(?:§\d+(?:\.\d+)*(?:\s*[–-]\s*\d+(?:\.\d+)*)?|D\d+)"
# "docs/math.md" followed by a list of references separated by commas, "and" or "&"
_MATH_CITATION = re.compile(rf"docs/math\.md((?:(?:\s*,\s*|\s+and\s+|\s*&\s*|\s+){_REF})+)")
# "math.md §3.4" without the folder: not followable from a source file
_BARE_CITATION = re.compile(r"(?<!docs/)\bmath\.md\s+(?:§|D\d)")
_HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?(?:\s|$)", re.MULTILINE)
_DECISION = re.compile(r'<a\s+id="D(\d+)"\s*>|^\s*(?:[-*]|\d+\.)?\s*(?:<a[^>]*></a>)?\s*\**D(\d+)\.', re.MULTILINE)


def _files() -> list[Path]:
    out = []
    for top in SCANNED:
        base = ROOT / top
        if not base.exists():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                out.append(path)
    readme = ROOT / "README.md"
    if readme.exists():
        out.append(readme)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def math_targets(text: str) -> tuple[set[str], set[int]]:
    """The section numbers (``"3"``, ``"3.4"``, ``"3.2.1"``) and decision numbers of a math.md text."""
    sections = {m.group(1) for m in _HEADING.finditer(text)}
    decisions = {int(a or b) for a, b in _DECISION.findall(text)}
    return sections, decisions


def citations(text: str) -> list[tuple[int, str]]:
    """``(offset, reference)`` for every reference of every ``docs/math.md`` citation in ``text``:
    references are ``"§3.4"`` (range ends become their own ``"§3.8"``) or ``"D10"``."""
    found = []
    for match in _MATH_CITATION.finditer(text):
        for ref in re.finditer(_REF, match.group(1)):
            token = ref.group(0)
            if token.startswith("D"):
                found.append((match.start(), token))
                continue
            for number in re.findall(r"\d+(?:\.\d+)*", token):
                found.append((match.start(), "§" + number))
    return found


def unresolved(text: str, sections: set[str], decisions: set[int]) -> list[str]:
    """The references of ``text`` that name no heading / decision of math.md."""
    bad = []
    for offset, ref in citations(text):
        ok = int(ref[1:]) in decisions if ref.startswith("D") else ref[1:] in sections
        if not ok:
            bad.append(f"line {_line(text, offset)}: {ref}")
    return bad


def test_math_md_has_the_numbered_structure() -> None:
    sections, decisions = math_targets(MATH.read_text(encoding="utf-8"))
    assert decisions == set(range(1, 17)), sorted(decisions)
    expected = {"0", "1", "2", "3", "4", "4.1", "5", "6", "7", "8", "8.1", "8.2", "9", "10"}
    expected |= {f"3.{i}" for i in range(1, 11)} | {f"5.{i}" for i in range(1, 8)}
    expected |= {f"7.{i}" for i in range(1, 5)} | {"3.2.1", "3.2.2"}
    assert expected <= sections, sorted(expected - sections)


def test_no_file_cites_the_external_spec() -> None:
    me = Path(__file__).resolve()
    offenders = []
    for path in _files():
        if path.resolve() == me:
            continue
        text = _read(path)
        for match in [*_SPEC_CITATION.finditer(text), *_BARE_CITATION.finditer(text)]:
            offenders.append(f"{path.relative_to(ROOT)}:{_line(text, match.start())}: {match.group(0)!r}")
    assert not offenders, "cite docs/math.md §… instead of the spec or a bare math.md:\n" + "\n".join(offenders)


def test_every_math_citation_resolves() -> None:
    sections, decisions = math_targets(MATH.read_text(encoding="utf-8"))
    me = Path(__file__).resolve()
    offenders, count = [], 0
    for path in _files():
        if path.resolve() == me:
            continue
        text = _read(path)
        count += len(citations(text))
        offenders += [f"{path.relative_to(ROOT)} {item}" for item in unresolved(text, sections, decisions)]
    assert not offenders, "citations of missing docs/math.md sections:\n" + "\n".join(offenders)
    assert count > 0, "no docs/math.md citation found: the scanner is broken"


def test_the_checker_catches_a_missing_section() -> None:
    sections, decisions = math_targets(MATH.read_text(encoding="utf-8"))
    good = "(docs/math.md §3.4) and (docs/math.md D10, §8.2) and docs/math.md §3.7–3.8 and docs/math.md §0 and §2"
    assert unresolved(good, sections, decisions) == []
    assert len(citations(good)) == 7
    assert unresolved("see docs/math.md §3.99 for details", sections, decisions) == ["line 1: §3.99"]
    assert unresolved("(docs/math.md D17)", sections, decisions) == ["line 1: D17"]
    assert unresolved("docs/math.md §3.7–3.42", sections, decisions) == ["line 1: §3.42"]
    assert unresolved("x\ndocs/math.md §5.3 test vectors, §44", sections, decisions) == []  # list ends at "test"
    assert _SPEC_CITATION.search("(spec Part II §7.2)") and _SPEC_CITATION.search("Spec §4.1")
    assert _SPEC_CITATION.search("spec Part\nI item 14")
    assert not _SPEC_CITATION.search("parse_shapes(spec) and timespec='seconds' and grouping_spec")
    assert _BARE_CITATION.search("see math.md §3.4") and not _BARE_CITATION.search("see docs/math.md §3.4")


# ------------------------------------------------------------------ the §4.1 worked numbers
def _lotr(rank: int):
    from tensoradapt import presets

    return presets.lotr(rank)  # S = 24 comes from the shapes


def _config(label: str):
    from tensoradapt import presets

    return {
        "LoRA r=1": lambda: presets.lora(1),
        "LoRA r=8": lambda: presets.lora(8),
        "LoTR r=2": lambda: _lotr(2),
        "LoTR r=4": lambda: _lotr(4),
        "LoRTA M=3 G=1 r=4": lambda: presets.lorta(3, 4, groups=1),
        "LoRTA M=3 G=1 r=8": lambda: presets.lorta(3, 8, groups=1),
        "LoRTA M=4 G=1 r=2": lambda: presets.lorta(4, 2, groups=1),
        "LoRTA M=5 G=1 r=8": lambda: presets.lorta(5, 8, groups=1),
        "LoRTA M=3 G=12 r=4": lambda: presets.lorta(3, 4, groups=12),
    }[label]()


@pytest.mark.parametrize(
    ("label", "stated"),
    [("LoRA r=1", "36,864"), ("LoRA r=8", "294,912"), ("LoTR r=2", "3,168"), ("LoTR r=4", "6,528"),
     ("LoRTA M=3 G=1 r=4", "2,968"), ("LoRTA M=3 G=1 r=8", "6,320"), ("LoRTA M=4 G=1 r=2", "512"),
     ("LoRTA M=5 G=1 r=8", "33,848"), ("LoRTA M=3 G=12 r=4", "16,032")],
)
def test_math_md_vit_base_counts_match_count_params(label: str, stated: str) -> None:
    from tensoradapt import count_params

    text = MATH.read_text(encoding="utf-8")
    section = text[text.index("### 4.1"): text.index("## 5.")]
    assert stated in section, f"docs/math.md §4.1 no longer states {stated} ({label})"
    config = _config(label)
    assert count_params(config, [(768, 768)] * 24) == int(stated.replace(",", ""))
