"""The package's layout follows the pipeline: each subpackage imports only its own modules or lower ones
(ARCHITECTURE.md), so that the folders say where each piece lives and what it may use."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "ranksearch"
LAYERS = ["utils", "data", "models", "decompose", "objectives", "study", "train", "inspect", "search", "deliver"]
TOP = len(LAYERS)  # the commands (cli, run, __main__) and the package's own __init__: above every subpackage


def layer_of(module: str) -> int:
    """The layer of a module named relative to the package ("search.trial", "cli", "" for the package itself)."""
    head = module.split(".")[0]
    return LAYERS.index(head) if head in LAYERS else TOP


def module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every ranksearch import in ``path``, at any depth (a function's lazy imports too): (line, the imported
    module relative to the package, the names imported from it)."""
    me, is_package = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if me else []
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").split(".")[0] == "ranksearch":
                target = node.module.removeprefix("ranksearch").lstrip(".")
            else:
                continue
            found.append((node.lineno, target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ranksearch":
                    found.append((node.lineno, alias.name.removeprefix("ranksearch").lstrip("."), []))
    return found


def upward_imports() -> list[str]:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me, _ = module_name(path)
        for line, target, names in imports_of(path):
            if target == "" and names == ["__version__"]:
                continue  # the version string, from the package's __init__
            if not target and names:  # ``from . import x`` at the top: each name is a module
                targets = names
            else:
                targets = [target]
            for imported in targets:
                if layer_of(imported) > layer_of(me):
                    wrong.append(f"{path.relative_to(REPO)}:{line} ({me}) imports {imported or 'ranksearch'}")
    return wrong


def test_no_subpackage_imports_one_above_it():
    assert upward_imports() == []


def test_every_module_lives_in_a_layer_or_is_a_command():
    loose = [p.name for p in PACKAGE.glob("*.py")]
    assert sorted(loose) == ["__init__.py", "__main__.py", "cli.py", "run.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_every_subpackage_says_what_it_owns():
    for name in LAYERS:
        docstring = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert docstring and len(docstring.split()) >= 15, name


def test_the_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a data module that imports the search is caught."""
    fake = tmp_path / "ranksearch"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from ..search.trial import Objective\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert upward_imports() == ["ranksearch/data/bad.py:2 (data.bad) imports search.trial"]
