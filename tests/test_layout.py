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
* The torch bindings (issue 23): their modules import downward only (``TORCH_LAYERS``), their
  ``__init__`` only re-exports; no module outside the method registry and a method's own package
  compares method names or method types; no file of ``tensoradapt/`` or ``bindings/`` is over 500
  lines, and no function over 80.
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
    "bindings/torch/files/write.py": (1, "canonical_header re-reads the header safetensors.save has just produced in "
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


# ---------------------------------------------------------------------------------- the torch bindings (issue 23)
TORCH = ROOT / "bindings" / "torch"

#: The layers of ``bindings/torch`` (``tensoradapt.torch``), lowest first: a module imports only from
#: its own layer or a lower one (docs/architecture.md draws them).  A name is a module or a package
#: (every module under the package); ``__init__`` is the package itself, which only re-exports.
TORCH_LAYERS: tuple[tuple[str, ...], ...] = (
    ("modules", "distributed", "progress"),         # what a base layer is; DDP/FSDP2/DTensor; the progress bar
    ("functional", "target_forward", "bypass", "memory"),  # autograd Functions and the forwards built on them
    ("container",),                                 # model.tensoradapt and the model's save hook
    ("files",),                                     # our safetensors files and folders
    ("targets", "lifecycle"),                       # which modules are targets; the adapter base
    ("methods",),                                   # the registry of methods
    ("api",),                                       # attach / load: choose a method through the registry
    ("superlora", "glora"),                         # each method's layer, adapter, files and registration
    ("peft", "lycoris"),                            # other libraries' formats, one codec per format
    ("hf",),                                        # transformers: Trainer checkpoints
    ("cli",),                                       # tensoradapt export-peft
    ("_pickle_compat",),                            # old module paths for pickles of earlier versions (imports
                                                    # the modules that now hold the names; imported by __init__ only)
    ("__init__",),                                  # re-exports only
)


def _torch_module(path: Path) -> str:
    """``tensoradapt.torch``-relative dotted name of a file of ``bindings/torch`` (``__init__`` for the package)."""
    parts = list(path.relative_to(TORCH).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _torch_layer(module: str) -> int | None:
    head = module.split(".")[0]
    return next((i for i, names in enumerate(TORCH_LAYERS) if head in names), None)


def _is_torch_module(dotted: str) -> bool:
    path = TORCH.joinpath(*dotted.split(".")) if dotted != "__init__" else TORCH
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only: no arrow at run time)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return found


def _torch_arrows(path: Path, tree: ast.AST) -> list[tuple[str, str, bool, ast.AST]]:
    """``(source, target, through_package, node)`` for every import of a ``tensoradapt.torch`` module in
    ``path`` (function-level imports included, ``TYPE_CHECKING`` blocks excluded).  ``through_package``:
    a name imported from a package's ``__init__`` rather than from the module defining it."""
    source = _torch_module(path)
    package = [] if source == "__init__" else source.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    skip = _typing_only(tree)
    arrows = []
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            bases = [a.name.split(".")[2:] for a in node.names if a.name.startswith("tensoradapt.torch")]
            arrows += [(source, ".".join(b) or "__init__", False, node) for b in bases]
            continue
        if node.level:
            base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif node.module and (node.module + ".").startswith("tensoradapt.torch."):
            base = node.module.split(".")[2:]
        else:
            continue
        for alias in node.names:
            sub = ".".join([*base, alias.name])
            if _is_torch_module(sub):  # `from .files import read`: the submodule itself
                arrows.append((source, sub, False, node))
            else:
                target = ".".join(base) or "__init__"
                package_init = target == "__init__" or (TORCH.joinpath(*base) / "__init__.py").is_file()
                arrows.append((source, target, package_init, node))
    return arrows


def _upward_arrows(paths: list[Path]) -> list[str]:
    offenders = []
    for path in paths:
        tree = _tree(path)
        for source, target, through_package, node in _torch_arrows(path, tree):
            here, there = _torch_layer(source), _torch_layer(target)
            where = f"{_rel(path)}:{node.lineno}"
            if here is None or there is None:
                offenders.append(f"{where}: {source} -> {target} (a module in no layer of TORCH_LAYERS)")
            elif there > here:
                offenders.append(f"{where}: {source} (layer {here}) imports {target} (layer {there}): an arrow up")
            elif through_package and path.name != "__init__.py" and target.split(".")[0] != source.split(".")[0]:
                offenders.append(f"{where}: {source} imports from the package {target} (import the defining module)")
    return list(dict.fromkeys(offenders))  # one line per import statement and target


def test_torch_bindings_import_downward_only() -> None:
    """0 arrows running back up inside ``bindings/torch``, every module in a layer, no name taken from
    another package's ``__init__`` (the dependency would hide the module that defines it)."""
    assert not _upward_arrows(_modules(TORCH)), "\n".join(_upward_arrows(_modules(TORCH)))


def test_torch_init_only_reexports() -> None:
    """``tensoradapt.torch``'s ``__init__`` defines nothing: imports, ``__all__`` and the guard that
    names PyTorch when it is missing."""
    tree = _tree(TORCH / "__init__.py")
    allowed = (ast.Import, ast.ImportFrom, ast.Try)
    offenders = [f"line {node.lineno}: {type(node).__name__}" for node in tree.body
                 if not isinstance(node, allowed) and not (isinstance(node, ast.Expr) and isinstance(node.value,
                 ast.Constant)) and not (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__all__")]
    assert not offenders, offenders


#: The method names and the method types whose comparison chooses behaviour per method.
_METHOD_NAMES = {"superlora", "glora"}
_METHOD_TYPES = {"SuperLoRAConfig", "GLoRAConfig", "SuperLoRAAdapter", "GLoRAAdapter", "SuperLoRALayer",
                 "GLoRALayer", "Adapter", "AdaptedLayer"}
#: Where a method may be named: the registry and the method's own package.
_METHOD_HOMES = ("bindings/torch/methods.py", "bindings/torch/superlora/", "bindings/torch/glora/")


def _method_choices(tree: ast.AST) -> list[ast.AST]:
    """Nodes that choose behaviour by method: a comparison with ``"superlora"``/``"glora"`` (``==``,
    ``in``, a ``match`` case), a table keyed by them, ``isinstance``/``issubclass`` with a method's type."""
    def names_method(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Constant) and n.value in _METHOD_NAMES for n in ast.walk(node))

    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(names_method(x) for x in (node.left, *node.comparators)):
            found.append(node)
        elif isinstance(node, ast.MatchValue) and names_method(node.value):
            found.append(node)
        elif isinstance(node, ast.Dict) and any(k is not None and names_method(k) for k in node.keys):
            found.append(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
              and any(isinstance(n, (ast.Name, ast.Attribute)) and (n.id if isinstance(n, ast.Name) else n.attr)
                      in _METHOD_TYPES for n in ast.walk(node.args[1]))):
            found.append(node)
    return found


def test_no_method_name_comparison_outside_the_registry() -> None:
    """Per-method behaviour lives in the method's package behind the registry (``methods.py``): no other
    module of the bindings compares method names or method types."""
    offenders = [
        f"{_rel(path)}:{node.lineno}: {ast.unparse(node)[:80]}"
        for path in _modules(ROOT / "bindings")
        if not _rel(path).startswith(_METHOD_HOMES)
        for node in _method_choices(_tree(path))
    ]
    assert not offenders, "\n".join(offenders)


#: Most lines of a file, and of a function (its ``def`` line to its last line), in ``tensoradapt/`` and ``bindings/``.
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def _long_functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_file_over_500_lines() -> None:
    offenders = {_rel(p): n for p in _modules(CORE, ROOT / "bindings")
                 if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not offenders, f"files over {MAX_FILE_LINES} lines (split them by responsibility): {offenders}"


def test_no_function_over_80_lines() -> None:
    offenders = [f"{_rel(p)}:{line} {name} ({n} lines)" for p in _modules(CORE, ROOT / "bindings")
                 for name, line, n in _long_functions(_tree(p))]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: {offenders}"


def test_the_torch_layout_detectors_can_fail(tmp_path: Path) -> None:
    """Each issue-23 detector recognises what it forbids (and passes what it allows)."""
    for code in ('if method == "superlora": pass', 'x = "glora" in kinds', "isinstance(config, GLoRAConfig)",
                 'KEYS = {"superlora": 1}', 'match m:\n    case "glora": pass',
                 "issubclass(t, (int, SuperLoRAAdapter))"):
        assert _method_choices(ast.parse(code)), code
    for code in ('method = "superlora"', "isinstance(config, dict)", 'register(name="glora")', "of_adapter(a).name"):
        assert not _method_choices(ast.parse(code)), code
    assert _long_functions(ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES))
    assert not _long_functions(ast.parse("def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)))
    low, high = TORCH / "modules.py", TORCH / "api.py"  # real modules of two layers, parsed from text below
    for path, code, bad in ((low, "from .api import attach", True), (low, "def f():\n    from . import hf", True),
                            (high, "from .modules import forward_kind", False),
                            (high, "from .superlora import SuperLoRAAdapter", True),
                            (high, "from .files import read", False),
                            (TORCH / "hf.py", "from .glora import GLoRAAdapter", True),
                            (TORCH / "hf.py", "from .glora.adapter import GLoRAAdapter", False)):
        tree = ast.parse(code)
        offenders = []
        for source, target, through_package, _ in _torch_arrows(path, tree):
            here, there = _torch_layer(source), _torch_layer(target)
            if there > here or (through_package and target.split(".")[0] != source.split(".")[0]):
                offenders.append(target)
        assert bool(offenders) == bad, (path.name, code, offenders)
