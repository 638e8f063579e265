"""The layout rules of docs/architecture.md, checked on the source (each fails if a rule is broken).

* Only ``tensoradapt/_backend.py`` imports ``array_api_compat``: every array-library call of the
  core goes through the dispatch module.
* The core (``tensoradapt/``) never imports a framework at import time, and never imports the
  bindings (``tensoradapt.torch``) or the demo (``tensoradapt.demo``) at all: bindings depend on the
  core, never the reverse.  The CLI reaches the demo only through an entry point.
* No library module imports another module's private name (``from x import _y``), and none reads
  a private attribute of an object that is not ``self``/``cls`` (``plan._projection``) — except the
  few uses of PyTorch's own private module API listed in ``_TORCH_PRIVATE``.
* One parameter-name scheme: the ``g{g}.split{k}.{block}`` names are built in one module only.
* One integer check: no library module defines its own ``_is_int``.
* One strict JSON reader: no module of the core or the bindings calls ``json.load``/``json.loads``
  except ``tensoradapt/_json.py`` and the trusted reads listed in ``_TRUSTED_JSON``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "tensoradapt"
LIBRARY = (CORE, ROOT / "bindings", ROOT / "demo")

#: Private attributes of PyTorch itself that the bindings use because PyTorch has no public API for
#: them: ``torch._C`` holds ``_current_graph_task_id`` (the hook torch.utils.checkpoint uses);
#: ``Tensor._version`` is the in-place version counter; ``Variable._execution_engine.queue_callback``
#: runs a callback when the current backward pass ends (the SuperLoRA adapter frees ΔW recomputed
#: under activation checkpointing there).
_TORCH_PRIVATE = {"_C", "_version", "_execution_engine"}


def _modules(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _imports(tree: ast.AST) -> list[tuple[str, list[str], ast.AST]]:
    """(module, imported names, node) of every import statement, relative imports as written."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found.append((module, [alias.name for alias in node.names], node))
    return found


def test_only_the_backend_module_imports_array_api_compat() -> None:
    offenders = [
        f"{_rel(path)}:{node.lineno}"
        for path in _modules(*LIBRARY)
        for module, _, node in _imports(_tree(path))
        if module.split(".")[0] == "array_api_compat" and path != CORE / "_backend.py"
    ]
    assert not offenders, f"array_api_compat imported outside tensoradapt/_backend.py: {offenders}"


def test_core_never_imports_the_bindings_or_the_demo() -> None:
    offenders = []
    for path in _modules(CORE):
        for module, names, node in _imports(_tree(path)):
            absolute = module.lstrip(".")
            if absolute.startswith(("tensoradapt.torch", "tensoradapt.demo")) or (
                absolute == "tensoradapt" and {"torch", "demo"} & set(names)
            ):
                offenders.append(f"{_rel(path)}:{node.lineno} imports {module} {names}")
    assert not offenders, offenders


def test_core_imports_no_framework_at_import_time() -> None:
    code = (
        "import sys, tensoradapt, tensoradapt.ops, tensoradapt.superlora, tensoradapt.glora, "
        "tensoradapt.analysis, tensoradapt.cli, tensoradapt.buffers\n"
        "bad = [m for m in ('torch', 'cupy', 'tensorly', 'jax', 'matplotlib', 'safetensors', 'tqdm') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = [
        f"{_rel(path)}:{node.lineno} imports {name} from {module}"
        for path in _modules(*LIBRARY)
        for module, names, node in _imports(_tree(path))
        for name in names
        if _private(name)
    ]
    assert not offenders, offenders


def _defined_here(tree: ast.AST) -> set[str]:
    """Private names a module defines itself: functions/classes, ``self._x = …`` and class attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    names.add(target.attr)
                elif isinstance(target, ast.Name):
                    names.add(target.id)
    return {name for name in names if _private(name)}


def test_no_private_attribute_is_reached_across_modules() -> None:
    offenders = []
    for path in _modules(*LIBRARY):
        tree = _tree(path)
        own = _defined_here(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            if node.attr in own or node.attr in _TORCH_PRIVATE:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            offenders.append(f"{_rel(path)}:{node.lineno} reads .{node.attr} of {ast.unparse(node.value)}")
    assert not offenders, offenders


def _builds_split_names(node: ast.AST) -> bool:
    """An f-string whose literal parts contain ``.split`` right after a formatted group index."""
    if not isinstance(node, ast.JoinedStr):
        return False
    literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return ".split" in literal and literal.lstrip().startswith("g")


def test_parameter_names_are_built_in_one_place() -> None:
    builders = sorted({
        _rel(path) for path in _modules(*LIBRARY) for node in ast.walk(_tree(path)) if _builds_split_names(node)
    })
    assert len(builders) <= 1, f"g{{g}}.split{{k}}.name built by hand in {builders}"


def test_one_integer_check() -> None:
    offenders = [
        f"{_rel(path)}:{node.lineno}"
        for path in _modules(*LIBRARY)
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.FunctionDef) and node.name in ("_is_int", "_check_count", "_check_int")
    ]
    assert not offenders, f"integer checks outside tensoradapt._validate: {offenders}"


#: The ``json.load``/``json.loads`` calls allowed outside the strict reader, by file: ``(count, why)``.
#: Everything a user or an attacker supplies goes through ``tensoradapt._json.loads_strict``.
_TRUSTED_JSON = {
    "tensoradapt/_json.py": (1, "the strict reader itself, after its depth check and with its hooks"),
    "bindings/torch/_io.py": (1, "canonical_header re-reads the header safetensors.save has just produced in "
                                 "this process from our own tensors and metadata, before anything is written"),
    "tensoradapt/testing.py": (1, "the fuzz ledger merges the report file named by TENSORADAPT_FUZZ_REPORT, "
                                  "which only the test harness writes"),
}


def _json_parses(tree: ast.AST) -> list[ast.AST]:
    """``json.load(s)(...)`` calls and ``from json import load(s)`` imports (ways to parse JSON unchecked)."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "json"):
            found.append(node)
        elif isinstance(node, ast.ImportFrom) and node.module == "json" and {"load", "loads"} & {
                a.name for a in node.names}:
            found.append(node)
    return found


def test_untrusted_json_goes_through_the_strict_reader() -> None:
    """No module of the core or the bindings parses JSON itself, except the reviewed trusted reads."""
    counts = {_rel(path): len(_json_parses(_tree(path))) for path in _modules(CORE, ROOT / "bindings")}
    offenders = {path: n for path, n in counts.items() if n and n != _TRUSTED_JSON.get(path, (0, ""))[0]}
    assert not offenders, (f"json.load/json.loads outside tensoradapt._json (use loads_strict, or justify the read "
                           f"in _TRUSTED_JSON): {offenders}")
    stale = sorted(set(_TRUSTED_JSON) - {path for path, n in counts.items() if n})
    assert not stale, f"_TRUSTED_JSON lists files that no longer parse JSON: {stale}"


def test_the_json_detector_can_fail() -> None:
    for code in ("json.loads(text)", "json.load(fh)", "from json import loads"):
        assert _json_parses(ast.parse(code)), code
    for code in ("json.dumps(x)", "loads_strict(text, max_depth=8)", "from json import dumps"):
        assert not _json_parses(ast.parse(code)), code


@pytest.mark.parametrize("rule", [_builds_split_names])
def test_the_checks_can_fail(rule) -> None:
    """The name-scheme detector recognises the hand-built form it is meant to forbid."""
    assert rule(ast.parse('f"g{g}.split{k}.core"', mode="eval").body)
    assert not rule(ast.parse('f"layer{g}"', mode="eval").body)
