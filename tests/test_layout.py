"""The plan of the library holds: no import circle among its modules (module-level or inside functions), the pure
parts load without Lightning, and a checkpoint followed through ``export_model`` never climbs back into a file it
came from."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import robust
from robust.export import export_model

ROOT = Path(robust.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The robust modules ``path`` imports anywhere (type-checking-only imports left out)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("robust"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("robust")}
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    # a package's __init__ only re-exports (lazily): edges into its submodules are not a dependency of theirs
    return {name: imports_of(path, known) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle():
    assert cycles(import_graph()) == []


def import_time_names(path: Path) -> set[str]:
    """Every module name ``path`` imports when it is imported: its statements outside functions (type-checking-only
    imports left out), with each package above an imported module."""
    names, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    return {".".join(n.split(".")[: i + 1]) for n in names for i in range(n.count(".") + 1)}


def test_the_pure_parts_import_no_lightning():
    """What ``import robust, robust.attacks, ...; from robust import load_model`` loads, followed through every robust
    module it imports: no Lightning (test_imports.py checks the same in a fresh interpreter, in ``make test-all``)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    seen, todo = set(), ["robust", "robust.attacks", "robust.defenses", "robust.models.resolve", "robust.export"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += import_time_names(files[name]) if name in files else []
    outside = {n.partition(".")[0] for n in seen if n not in files}
    assert "torch" in outside and not outside & {"lightning", "pytorch_lightning"}, sorted(outside)


def robust_file(frame) -> str | None:
    """The library file (relative to ``robust/``) a frame runs in; None outside the library and for module bodies."""
    path = Path(frame.f_code.co_filename)
    if frame.f_code.co_name == "<module>" or not path.is_relative_to(ROOT):
        return None
    return str(path.relative_to(ROOT))


def file_climbs(fn) -> tuple[list[str], list[tuple[str, str]]]:
    """Run ``fn()`` under a profiler: the library files in the order they are first entered, and every call from one
    library file into another that is already further up the stack (a climb back up: ``(from, into)``)."""
    stack: list[tuple[int, str]] = []  # (frame id, library file) of each open library frame, outermost first
    entered, climbs = [], []

    def profile(frame, event, _arg) -> None:
        name = robust_file(frame) if event in ("call", "return") else None
        if name is None:
            return
        if event == "call":
            files = [f for _, f in stack]
            if files and name != files[-1] and name in files:
                climbs.append((files[-1], name))
            if name not in entered:
                entered.append(name)
            stack.append((id(frame), name))
        elif stack and stack[-1][0] == id(frame):
            stack.pop()

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entered, climbs


def test_a_checkpoint_followed_through_export_never_climbs_back(resnet18_ckpt, tmp_path):
    """``export_model`` on a real checkpoint: reading it, building the carded model, writing the folder. No call goes
    from one library file back into a file further up the call stack (the layers only call downwards)."""
    entered, climbs = file_climbs(lambda: export_model(resnet18_ckpt, tmp_path / "export"))
    assert entered[0] == "export/folder.py" and "models/resolve.py" in entered
    assert climbs == []
