"""Plugins: Python files (or modules) imported before a command runs, each registering what it adds.

A plugin file may register a model (``ranksearch.models.register_model``), a decomposition
(``ranksearch.decompose.register_decomposition``) or a cost (``ranksearch.objectives.register_cost``). The config's
``plugins`` (``--plugin FILE.py``) lists them; a study records them, so that its workers, ``export`` and
``load_model`` import them again.
"""

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError, first_line

_LOADED: set[str] = set()  # what this process imported already


def same_definition(a, b) -> bool:
    """True for one class or function of one file imported twice (e.g. as a test module and as a plugin): a
    registry lets it replace itself, where another definition under a taken name is refused."""
    return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)


def resolved(plugin: str) -> str:
    """A plugin as the config records it: a file as its absolute path, a module name as it is."""
    return str(Path(plugin).resolve()) if plugin.endswith(".py") else plugin


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin once per process; a one-line UserError for a missing or failing one."""
    for plugin in plugins:
        if plugin in _LOADED:
            continue
        try:
            _import(plugin)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"plugin {plugin} failed to load: {type(error).__name__}: {first_line(error)}") from None
        _LOADED.add(plugin)


def _import(plugin: str) -> None:
    if not plugin.endswith(".py"):
        try:
            importlib.import_module(plugin)
        except ModuleNotFoundError as error:
            if error.name != plugin.partition(".")[0] and error.name != plugin:
                raise
            raise UserError(f"plugin {plugin}: no such module; pass a .py file or an importable module") from None
        return
    path = Path(plugin)
    if not path.is_file():
        raise UserError(f"plugin {plugin}: no such file; pass the path of a .py file")
    name = f"ranksearch_plugin_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
