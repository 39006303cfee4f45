"""Plugins: Python files (or modules) imported before a command runs, each registering what it adds.

A plugin file may register a model (``ranksearch.models.register_model``), a decomposition
(``ranksearch.decompose.register_decomposition``) or a cost (``ranksearch.objectives.register_cost``). The config's
``plugins`` (``--plugin FILE.py``) lists them. A study, and an export, records each by content (``plugin_record``:
its file name and the SHA-256 of its source), never to import it: a recorded plugin runs only when the user names
it on the command (``--plugin``, ``load_model(path, plugins=[...])``), and it must then be the recorded code
(``unmatched``), wherever it lies now.
"""

import hashlib
import importlib
import importlib.util
import inspect
import reprlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import UserError, first_line

_LOADED: dict[str, dict] = {}  # what this process imported already: plugin -> the record of the code that ran
DIGEST_SHOWN = 12  # hex digits of a SHA-256 printed in messages


def same_definition(a, b) -> bool:
    """True for one class or function of one file imported twice (e.g. as a test module and as a plugin): a
    registry lets it replace itself, where another definition under a taken name is refused."""
    return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)


def resolved(plugin: str) -> str:
    """A plugin as this process imports it: a file as its absolute path, a module name as it is."""
    return str(Path(plugin).resolve()) if plugin.endswith(".py") else plugin


def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin once per process (a file is run from the very bytes its record digests); a one-line
    UserError for a missing or failing one. Only for plugins the user named on this command."""
    for plugin in plugins:
        if plugin in _LOADED:
            continue
        try:
            record = _import(plugin)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"plugin {plugin} failed to load: {type(error).__name__}: {first_line(error)}") from None
        _LOADED[plugin] = record


def _digest(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()


def _module_source(name: str) -> Path:
    """The source file of module ``name``, found without importing it (a dotted name's parent packages are
    imported: the user named the module on this command); a one-line UserError when there is none."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise UserError(f"plugin {name}: no such module; pass a .py file or an importable module")
    if not (spec.has_location and spec.origin and spec.origin.endswith(".py") and Path(spec.origin).is_file()):
        raise UserError(f"plugin {name}: module without a .py source file ({spec.origin}); pass a .py file")
    return Path(spec.origin)


def _file_source(plugin: str) -> bytes:
    path = Path(plugin)
    if not path.is_file():
        raise UserError(f"plugin {plugin}: no such file; pass the path of a .py file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise UserError(f"plugin {plugin}: cannot read it ({first_line(error)})") from None


def plugin_record(plugin: str) -> dict:
    """How a study and an export record ``plugin`` (a path or module name): ``{"name": "my_costs.py", "sha256":
    "..."}`` (a module: its name, and its source file's digest). Read, not imported; an imported plugin's record
    is the code that ran."""
    if plugin in _LOADED:
        return dict(_LOADED[plugin])
    if not plugin.endswith(".py"):
        return {"name": plugin, "sha256": _digest(_module_source(plugin).read_bytes())}
    return {"name": Path(plugin).name, "sha256": _digest(_file_source(plugin))}


def plugin_records(plugins: Sequence) -> list:
    """``plugins`` as recorded: each path or module name as its ``plugin_record``; a record as it is."""
    return [plugin if isinstance(plugin, dict) else plugin_record(plugin) for plugin in plugins]


def _import(plugin: str) -> dict:
    if not plugin.endswith(".py"):
        record = plugin_record(plugin)
        try:
            importlib.import_module(plugin)
        except ModuleNotFoundError as error:
            if error.name != plugin.partition(".")[0] and error.name != plugin:
                raise
            raise UserError(f"plugin {plugin}: no such module; pass a .py file or an importable module") from None
        return record
    path, source = Path(plugin), _file_source(plugin)
    name = f"ranksearch_plugin_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # the bytes digested, not a second read
    except BaseException:
        del sys.modules[name]
        raise
    return {"name": path.name, "sha256": _digest(source)}


# ----- a study's or an export's record ---------------------------------------------------------------------------


def recorded_plugins(value) -> list:
    """A recorded config's ``plugins`` as a list (of records; plain paths or module names in 0.8.0's)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def entry_name(entry) -> str:
    """A recorded plugin's name: ``my_costs.py`` (a 0.8.0 path: its file name), or a module's name."""
    if isinstance(entry, dict):
        return str(entry.get("name"))
    if isinstance(entry, str):
        return Path(entry).name if entry.endswith(".py") else entry
    return reprlib.repr(entry)


def _entry_digest(entry) -> str | None:
    digest = entry.get("sha256") if isinstance(entry, dict) else None
    return digest if isinstance(digest, str) else None


def entries_text(entries: Sequence) -> str:
    """Recorded plugins for a message: ``my_costs.py (sha256 0123456789ab)``, comma-separated."""
    texts = []
    for entry in entries:
        digest = _entry_digest(entry)
        texts.append(entry_name(entry) + (f" (sha256 {digest[:DIGEST_SHOWN]})" if digest else ""))
    return ", ".join(texts) or "none"


def _matches(entry, record: dict) -> bool:
    """Whether a passed plugin's ``record`` is the recorded ``entry``: the same content (the same name, for a
    0.8.0 record, which holds no digest)."""
    digest = _entry_digest(entry)
    return record["sha256"] == digest if digest else record["name"] == entry_name(entry)


def unmatched(owner: str, recorded: Sequence, passed: Sequence[str]) -> list:
    """The recorded plugins of ``owner`` (e.g. ``study 'smoke'``) that none of the ``passed`` ones is; a one-line
    UserError for a passed plugin that is none of them (another file, or the recorded one changed). Imports
    nothing."""
    left = list(recorded)
    for plugin in passed:
        record = plugin_record(plugin)
        found = [entry for entry in recorded if _matches(entry, record)]
        if found:
            left = [entry for entry in left if entry not in found]
            continue
        namesake = next((entry for entry in recorded if entry_name(entry) == record["name"]), None)
        if namesake is not None:
            raise UserError(
                f"plugin {plugin} is not the {record['name']} {owner} was made with: its content changed (sha256 "
                f"{record['sha256'][:DIGEST_SHOWN]}, recorded {str(_entry_digest(namesake))[:DIGEST_SHOWN]}); pass "
                "the file it was made with"
            )
        if not recorded:
            raise UserError(f"plugin {plugin}: {owner} was made with no plugin; do not pass one")
        raise UserError(f"plugin {plugin} is not one {owner} was made with (its plugins: {entries_text(recorded)}); "
                        "pass only those")  # fmt: skip
    return left


def pass_hint(entries: Sequence, api: bool = False) -> str:
    """How to pass ``entries`` again: ``--plugin PATH/my_costs.py`` or ``plugins=['PATH/my_costs.py']``."""
    paths = [f"PATH/{entry_name(entry)}" if entry_name(entry).endswith(".py") else entry_name(entry)
             for entry in entries]  # fmt: skip
    if api:
        return f"plugins={paths!r}"
    return " ".join(f"--plugin {path}" for path in paths)


def needs_plugins(
    owner: str, missing: Sequence[str], recorded: Sequence, left: Sequence, api: bool = False
) -> UserError:
    """The one-line error of a command that needs plugins it was not given: what ``owner`` uses that nothing
    registers (``missing``), and how to pass those of its ``recorded`` plugins that were not passed (``left``)."""
    uses = ", ".join(missing)
    if not left:
        return UserError(f"{owner} uses {uses}, which none of its plugins ({entries_text(recorded)}) registers")
    return UserError(
        f"{owner} uses {uses}, registered by its plugin(s) {entries_text(left)}: pass {pass_hint(left, api)} "
        "(a recorded plugin is never imported unless named; pass only code you trust)"
    )


def load_recorded(owner: str, recorded, passed: Sequence[str], missing: Callable[[], list[str]],
                  api: bool = False) -> None:  # fmt: skip
    """Import the plugins passed on this command (``passed``), each checked to be one of ``owner``'s ``recorded``
    plugins; then a one-line UserError if what the command uses of ``owner`` is still unregistered (``missing()``,
    asked after the import: "model 'x'", ...). A recorded plugin is never imported from its record."""
    passed, recorded = [resolved(p) for p in passed], recorded_plugins(recorded)
    if not (recorded or passed):
        return  # nothing of it can come from a plugin: what it names that is unknown is for the command to say
    left = unmatched(owner, recorded, passed)
    load_plugins(passed)
    still = missing()
    if still:
        raise needs_plugins(owner, still, recorded, left, api)
