"""Every code block of README.md and docs/*.md runs as written.

* ```` ```python ```` blocks: the blocks of one file run in order in one namespace (a block may use
  what an earlier block of the same file defined), in a temporary working directory of that file
  (files the blocks write land there), with matplotlib on Agg.  A test selected alone (``-k``)
  first runs the earlier blocks of its file.  Tracebacks point at the Markdown file's own lines.
* ```` ```bash ```` lines ``tensoradapt count …`` / ``tensoradapt compare …`` run in-process through
  ``tensoradapt.cli.main`` in the same folder; one that names a ``.safetensors`` / ``.json`` file
  that does not exist there must fail only because of that file (exit 2, "no such file"), which
  still checks its options.  pip installs, the demo and benchmark commands are not run.

A block that must not run (a GPU, a download, minutes of training) says so visibly, with a reason,
either on its fence line or in an HTML comment on the line before it::

    ```python no-run: needs a CUDA device
    <!-- no-run: downloads ViT-Base -->

Such blocks are reported as skipped (with file, line and reason) and there may be at most
``MAX_NO_RUN`` of them.
"""

from __future__ import annotations

import ast
import re
import shlex
import sys
import textwrap
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tensoradapt import cli

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NO_RUN = 3

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>.*)$")
# a stated result: ``expression  # 2968 …`` or ``name = expression  # 12,160 …`` (an integer first)
_STATED = re.compile(r"#\s*(?P<number>-?\d[\d,_]*)(?![\d.])")
_NO_RUN_INFO = re.compile(r"\bno-run\b:?\s*(?P<reason>.*)$")
_NO_RUN_COMMENT = re.compile(r"^<!--\s*no-run\b:?\s*(?P<reason>.*?)\s*-->\s*$")
_CLI_COMMANDS = ("count", "compare")
_SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: its file, 1-based line of the first code line, language and text."""

    path: Path
    index: int  # among the runnable blocks (python + CLI bash) of its file
    line: int
    language: str
    code: str
    no_run: str | None = None  # the reason given with a no-run marker

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.index}:{self.language}@L{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match.group("indent"), match.group("fence"), match.group("info").strip()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        language = info.split()[0].lower() if info else ""
        code = textwrap.dedent("\n".join(lines[i + 1:end])) if indent else "\n".join(lines[i + 1:end])
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        no_run = None
        if (marker := _NO_RUN_INFO.search(info)) is not None:
            no_run = marker.group("reason").strip() or "marked no-run"
        elif (marker := _NO_RUN_COMMENT.match(previous.strip())) is not None:
            no_run = marker.group("reason").strip() or "marked no-run"
        if language in ("python", "py", "python3") or (language in ("bash", "sh", "shell", "console")
                                                       and _cli_lines(code)):
            blocks.append(Block(path, len(blocks), i + 2, "python" if language.startswith("py") else "bash",
                                code, no_run))
        i = end + 1
    return blocks


def _cli_lines(code: str) -> list[list[str]]:
    """The ``tensoradapt count`` / ``tensoradapt compare`` commands of a shell block, as argv lists."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if "&&" in words:  # e.g. `pip install ... && tensoradapt demo`: installs are not run
            continue
        words = next((words[:k] for k, w in enumerate(words) if w in _SHELL_OPERATORS), words)
        if len(words) >= 2 and words[0] == "tensoradapt" and words[1] in _CLI_COMMANDS:
            commands.append(words[1:])
    return commands


ALL_BLOCKS = [block for path in DOC_FILES for block in _blocks(path)]


@dataclass
class _FileState:
    """The namespace and working folder shared by the blocks of one Markdown file."""

    folder: Path
    namespace: dict[str, Any]
    done: int = 0  # blocks [0, done) have run
    failed: list[str] = field(default_factory=list)


class _States(dict):
    """``{Markdown file: _FileState}``, created on first use (one temporary folder per file)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, path: Path) -> _FileState:
        stem = re.sub(r"\W", "_", path.stem)
        state = self[path] = _FileState(self.tmp_path_factory.mktemp(f"docs_{stem}"), {"__name__": f"docs_{stem}"})
        return state


@pytest.fixture(scope="module")
def states(tmp_path_factory) -> Iterator[_States]:
    yield _States(tmp_path_factory)
    if "matplotlib.pyplot" in sys.modules:  # figures the blocks left open
        sys.modules["matplotlib.pyplot"].close("all")


def stated_number(line: str) -> int | None:
    """The integer a code line's trailing comment states as its result (``x  # 12,160 params``)."""
    code, hash_, comment = line.partition("#")
    if not hash_ or not code.strip():
        return None
    match = _STATED.match("#" + comment)
    return None if match is None else int(match.group("number").replace(",", "").replace("_", ""))


def _run_python(block: Block, namespace: dict[str, Any]) -> None:
    """Run a Python block statement by statement; where a line states an integer result in its
    comment, the value of that expression (or of the assigned name) must be that integer."""
    # pad with blank lines so that tracebacks and linecache show the Markdown file's line numbers
    source = "\n" * (block.line - 1) + block.code + "\n"
    lines = source.splitlines()
    for statement in ast.parse(source, str(block.path)).body:
        stated = stated_number(lines[statement.end_lineno - 1]) if statement.lineno == statement.end_lineno else None
        module = ast.Module(body=[statement], type_ignores=[])
        exec(compile(module, str(block.path), "exec"), namespace)
        if stated is None:
            continue
        if isinstance(statement, ast.Expr):
            value = eval(compile(ast.Expression(statement.value), str(block.path), "eval"), namespace)
        elif isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(
                statement.targets[0], ast.Name):
            value = namespace[statement.targets[0].id]
        else:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            assert value == stated, (f"{block.path.name} line {statement.lineno}: the comment states {stated:,}, "
                                     f"the code gives {value:,}")


def _run_block(block: Block, state: _FileState, capsys) -> None:
    """Run one block in its file's namespace; raises what the block raises."""
    if block.language == "python":
        _run_python(block, state.namespace)
        return
    for argv in _cli_lines(block.code):
        capsys.readouterr()
        code = cli.main(argv)
        _, err = capsys.readouterr()
        if code == 0:
            continue
        missing = [a for a in argv if a.endswith((".safetensors", ".json")) and not Path(a).exists()]
        if missing and code == 2 and "no such file" in err:
            continue  # the options parsed; only the example's file is absent
        raise AssertionError(f"`tensoradapt {shlex.join(argv)}` exited {code}: {err.strip()}")


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_doc_block(block: Block, states, monkeypatch, capsys) -> None:
    if block.no_run is not None:
        pytest.skip(f"no-run block {block.id}: {block.no_run}")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    state = states[block.path]
    monkeypatch.chdir(state.folder)
    blocks = [b for b in ALL_BLOCKS if b.path == block.path]
    while state.done < block.index:  # the earlier blocks of the file, when this one runs alone
        earlier = blocks[state.done]
        state.done += 1
        if earlier.no_run is None:
            try:
                _run_block(earlier, state, capsys)
            except Exception as exc:
                state.failed.append(f"{earlier.id}: {type(exc).__name__}: {exc}")
    if state.done == block.index:
        state.done += 1
    failure = None
    try:
        _run_block(block, state, capsys)
    except Exception as exc:
        note = f"\n(earlier blocks of this file failed: {'; '.join(state.failed)})" if state.failed else ""
        state.failed.append(f"{block.id}: {type(exc).__name__}: {exc}")
        tb = exc.__traceback__  # from the block's own frame on
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        failure = (f"{block.id} raised {type(exc).__name__}: {exc}{note}\n\n"
                   + "".join(traceback.format_exception(type(exc), exc, tb)))
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_blocks_are_found_and_no_run_is_rare() -> None:
    files = {b.path for b in ALL_BLOCKS}
    assert ROOT / "README.md" in files and len([b for b in ALL_BLOCKS if b.language == "python"]) >= 5
    no_run = [f"{b.id}: {b.no_run}" for b in ALL_BLOCKS if b.no_run is not None]
    assert len(no_run) <= MAX_NO_RUN, "too many no-run blocks:\n" + "\n".join(no_run)


def test_extraction(tmp_path) -> None:
    """The parser itself: languages, markers, order, line numbers and the CLI lines of a shell block."""
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "# title", "```python", "x = 1", "```", "", "<!-- no-run: needs a GPU -->", "```python", "import cupy",
        "```", "```python no-run: downloads", "y = 2", "```", "```text", "not code", "```", "```bash",
        "pip install tensoradapt && tensoradapt demo", "tensoradapt count 8x8 --preset lora  # table",
        "tensoradapt demo --quick", "```", "```bash", "python benchmarks/bench_fwht.py", "```",
    ]), encoding="utf-8")
    blocks = _blocks(page)
    assert [(b.index, b.line, b.language, b.no_run) for b in blocks] == [
        (0, 3, "python", None), (1, 8, "python", "needs a GPU"), (2, 11, "python", "downloads"), (3, 17, "bash", None)]
    assert _cli_lines(blocks[3].code) == [["count", "8x8", "--preset", "lora"]]


def test_stated_results_are_checked() -> None:
    assert stated_number("plan.num_params   # 2968 (LoRA rank 1 would need 36,864)") == 2968
    assert stated_number("adapter = attach(m)   # 12,160 params") == 12160
    assert stated_number("x = 1  # see below") is None and stated_number("# 12 alone") is None
    good = Block(ROOT / "README.md", 0, 1, "python", "n = 3 * 4\nn  # 12\nm = n + 1  # 13 entries")
    _run_python(good, {})
    for wrong in ("n = 3 * 4\nn  # 13", "m = 12  # 1,200"):
        with pytest.raises(AssertionError, match="the comment states"):
            _run_python(Block(ROOT / "README.md", 0, 1, "python", wrong), {})


def test_indented_fences_are_found(tmp_path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("1. a step\n\n   ```python\n   y = 2\n   ```\n", encoding="utf-8")
    (block,) = _blocks(doc)
    assert block.code == "y = 2"
