"""The Markdown notes optuna-dashboard shows on a study's page and on each trial's: what a raw parameter
(``rank_block1 0.84375``) and a scroll box of user attrs do not say at a glance.

A trial's note: its state and val accuracy, each module's rank as k/32, every cost with its ratio to the baseline,
where its weights are, and ``copied_from`` / ``retry_of`` / why it failed or was pruned. The study's note: the
objectives, the baseline's accuracies and costs, the data and the config.

optuna-dashboard renders a note as Markdown with HTML, so everything from outside that goes into one (a path, a
module or model name, an error's text) passes through ``markdown_text`` or sits in a ``fenced`` block.
"""

import json
import re
import textwrap
from types import SimpleNamespace

import optuna

from ..models import rank_text
from ..objectives.registry import COSTS
from ..study.attrs import COPIED_FROM, FAIL_REASON, RETRY_OF, WEIGHTS_ATTR, WEIGHTS_NOT_KEPT, param_name
from ..study.config import default_storage_url
from ..utils.errors import shown_url

_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-!|~])")


def markdown_text(value: object) -> str:
    """``value`` as literal text in a note: one line, HTML's ``& < >`` as entities and Markdown's punctuation
    backslash-escaped, so nothing in it renders as a tag, a link, a table cell or a format."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)


def fenced(text: str, language: str = "") -> str:
    """``text`` as a Markdown code block (shown verbatim, never rendered), its fence longer than any run of
    backticks in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def trial_note(trial: optuna.trial.FrozenTrial, modules: list[str], costs: list[str], export: str,
               baseline_val: float | None = None) -> str:  # fmt: skip
    """The Markdown of ``trial``'s note (``costs``: every cost the trial may have measured; ``export``: the command
    that exports a trial of this study, ``export_command``; ``baseline_val``: the baseline's val accuracy, which
    the trial's is set against)."""
    lines = [f"## Trial {trial.number}: {trial.state.name.lower()}", ""]
    if trial.values:
        against = "" if baseline_val is None else (
            f" (baseline {baseline_val:.2%}: {100 * (trial.values[0] - baseline_val):+.2f} points)")  # fmt: skip
        lines += [f"**val accuracy {trial.values[0]:.2%}**{against}", ""]
    lines += ["| module | rank |", "|---|---|"]
    lines += [f"| {markdown_text(m)} | {_rank(trial.params.get(param_name(m)))} |" for m in modules]
    measured = [(COSTS[name], trial.user_attrs.get(COSTS[name].attr)) for name in costs if name in COSTS]
    measured = [(metric, value) for metric, value in measured if value is not None]
    if measured:
        lines += ["", "| cost | value | of the baseline's |", "|---|---|---|"]
        for metric, value in measured:
            ratio = trial.user_attrs.get(metric.ratio_attr)
            shown = "-" if ratio is None else markdown_text(f"{ratio:.3f}x")
            lines.append(f"| {markdown_text(metric.label)} | {markdown_text(metric.text(value))} | {shown} |")
    lines += ["", _weights_line(trial, export)]
    for key, text in ((COPIED_FROM, "copied from trial {}: the same ranks"), (RETRY_OF, "re-runs trial {}"),
                      (FAIL_REASON, "failed: {}"), ("pruned_at", "pruned: {}")):  # fmt: skip
        if key in trial.user_attrs:
            lines.append(broken(f"- {text.format(markdown_text(trial.user_attrs[key]))}"))
    return "\n".join(lines) + "\n"


NOTE_TEXT_COLUMNS = 90  # optuna-dashboard does not wrap a note's lines: longer ones widen the box past the window


def broken(line: str) -> str:
    """A note's text ``line`` (a list item's) with a Markdown hard break (a backslash at a line's end) where it
    passes ``NOTE_TEXT_COLUMNS`` (at spaces); the next lines indented to stay in the item. Raw HTML (``<br>``) is
    shown as text by the dashboard."""
    parts = textwrap.wrap(line, NOTE_TEXT_COLUMNS, break_long_words=False, break_on_hyphens=False)
    return "\\\n  ".join(parts)


def _rank(value: float | None) -> str:
    return "-" if value is None else rank_text(value)


def _weights_line(trial: optuna.trial.FrozenTrial, export: str) -> str:
    command = f"\n\n{fenced(pasted_export(export, trial))}\n"  # a block of its own
    seed = markdown_text(trial.user_attrs.get("seed"))
    if WEIGHTS_ATTR in trial.user_attrs:
        return broken(f"- weights: kept when it finished on the Pareto front (see Artifacts), and deleted if a later "
                      f"trial pushes it off; export uses them, or else re-runs its fine-tune (seed {seed}):") + command
    if trial.state == optuna.trial.TrialState.COMPLETE:
        why = trial.user_attrs.get(WEIGHTS_NOT_KEPT)
        why = "" if why is None else f" (the weights folder could not be written: {markdown_text(why)})"
        text = f"- weights: not kept{why}; to export the trial, re-running its fine-tune (seed {seed}):"
        return broken(text) + command
    return "- weights: none"


NOTE_COLUMNS = 72  # a pasted command is broken into lines of about this many characters (a note box's width)


def pasted_export(export: str, trial: optuna.trial.FrozenTrial) -> str:
    """The export command of ``trial``, writing into exports/ (not the current folder), broken with `` \\`` before
    a flag where a line would pass ``NOTE_COLUMNS`` (a note box's width)."""
    words = export.split(" ")
    study = words[words.index("--study-name") + 1] if "--study-name" in words else "study"
    chunks = []  # the command's head, then each flag with its value
    for word in [*words, "--trial", str(trial.number), "--out", f"exports/{study}-trial{trial.number}.pt"]:
        if word.startswith("--") or not chunks:
            chunks.append(word)
        else:
            chunks[-1] += f" {word}"
    lines = [chunks[0]]
    for chunk in chunks[1:]:
        if len(lines[-1]) + 1 + len(chunk) > NOTE_COLUMNS:
            lines.append(f"    {chunk}")
        else:
            lines[-1] += f" {chunk}"
    return " \\\n".join(lines)


def study_command(command: str, study_name: str, storage: str | None) -> str:
    """``python -m ranksearch COMMAND --study-name NAME`` (and ``--storage URL``, its password masked as ``***``
    by ``shown_url``, unless it is the default one): what a user pastes to act on this study."""
    line = f"python -m ranksearch {command} --study-name {study_name}"
    if not isinstance(storage, str) or storage == default_storage_url(study_name):
        return line  # the default, or not a URL (a test's storage object, say): left out
    return f"{line} --storage {shown_url(storage)}"


def export_command(study_name: str, storage: str | None) -> str:
    """What a user pastes to export a trial of this study (``study_command``)."""
    return study_command("export", study_name, storage)


def study_note(config_fields: dict, baseline: dict, data: dict, objectives: list[str]) -> str:
    """The Markdown of a study's note."""
    costs = ", ".join(f"{markdown_text(COSTS[name].label)} (minimise)" for name in objectives[1:] if name in COSTS)
    budget = config_fields.get("budget")
    goal = f"the best val accuracy within budget {markdown_text(budget)}" if budget else (
        f"val accuracy (maximise) vs {costs}")  # fmt: skip
    lines = [f"## {markdown_text(config_fields.get('model', '?'))} ranks: {goal}", ""]
    lines += [f"**Baseline**: val {baseline['val_accuracy']:.2%}, test {baseline['test_accuracy']:.2%}, "
              f"{baseline['macs']:,} MACs, {baseline['params']:,} params", ""]  # fmt: skip
    lines += ["Each trial's note gives its ranks as k/32 per module and its costs as ratios to the baseline's.", ""]
    lines += [f"**Data**: {markdown_text(', '.join(f'{k} {v}' for k, v in data.items()))}", ""]
    lines += ["**Config**", "", fenced(json.dumps(config_fields, indent=1, sort_keys=True), "json")]
    return "\n".join(lines) + "\n"


def save_trial_note(study: optuna.Study, trial: optuna.trial.FrozenTrial, body: str) -> None:
    """Write ``body`` as the note of ``trial`` (a finished one: optuna-dashboard needs only its storage ids)."""
    from optuna_dashboard import save_note

    save_note(SimpleNamespace(storage=study._storage, study=study, _trial_id=trial._trial_id), body)


def save_study_note(study: optuna.Study, body: str) -> None:
    from optuna_dashboard import save_note

    save_note(study, body)


class TrialNotes:
    """Optuna callback: each finished trial's note (``trial_note``)."""

    def __init__(self, modules: list[str], costs: list[str], export: str):
        self.modules, self.costs, self.export = modules, costs, export

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        baseline_val = study.user_attrs.get("baseline", {}).get("val_accuracy")
        save_trial_note(study, trial, trial_note(trial, self.modules, self.costs, self.export, baseline_val))
