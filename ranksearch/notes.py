"""The Markdown notes optuna-dashboard shows on a study's page and on each trial's: what a raw parameter
(``rank_block1 0.84375``) and a scroll box of user attrs do not say at a glance.

A trial's note: its state and val accuracy, each module's rank as k/32, every cost with its ratio to the baseline,
where its weights are, and ``copied_from`` / ``retry_of`` / why it failed or was pruned. The study's note: the
objectives, the baseline's accuracies and costs, the data and the config.
"""

import json
from types import SimpleNamespace

import optuna

from .attrs import COPIED_FROM, FAIL_REASON, RETRY_OF, WEIGHTS_ATTR, WEIGHTS_NOT_KEPT, param_name
from .config import default_storage_url
from .models import rank_text
from .objectives import COSTS


def trial_note(trial: optuna.trial.FrozenTrial, modules: list[str], costs: list[str], export: str) -> str:
    """The Markdown of ``trial``'s note (``costs``: every cost the trial may have measured; ``export``: the command
    that exports a trial of this study, ``export_command``)."""
    lines = [f"## Trial {trial.number}: {trial.state.name.lower()}", ""]
    if trial.values:
        lines += [f"**val accuracy {trial.values[0]:.2%}**", ""]
    lines += ["| module | rank |", "|---|---|"]
    lines += [f"| {m} | {_rank(trial.params.get(param_name(m)))} |" for m in modules]
    measured = [(COSTS[name], trial.user_attrs.get(COSTS[name].attr)) for name in costs if name in COSTS]
    measured = [(metric, value) for metric, value in measured if value is not None]
    if measured:
        lines += ["", "| cost | value | of the baseline's |", "|---|---|---|"]
        for metric, value in measured:
            ratio = trial.user_attrs.get(metric.ratio_attr)
            lines.append(f"| {metric.label} | {metric.text(value)} | {'-' if ratio is None else f'{ratio:.3f}x'} |")
    lines += ["", _weights_line(trial, export)]
    for key, text in ((COPIED_FROM, "copied from trial {}: the same ranks"), (RETRY_OF, "re-runs trial {}"),
                      (FAIL_REASON, "failed: {}"), ("pruned_at", "pruned: {}")):  # fmt: skip
        if key in trial.user_attrs:
            lines.append(f"- {text.format(trial.user_attrs[key])}")
    return "\n".join(lines) + "\n"


def _rank(value: float | None) -> str:
    return "-" if value is None else rank_text(value)


def _weights_line(trial: optuna.trial.FrozenTrial, export: str) -> str:
    command = f"\n\n```\n{export} --trial {trial.number} --out trial{trial.number}.pt\n```\n"  # a line of its own
    if WEIGHTS_ATTR in trial.user_attrs:
        return f"- weights: kept while on the Pareto front (see Artifacts); to export them:{command}"
    if trial.state == optuna.trial.TrialState.COMPLETE:
        seed = trial.user_attrs.get("seed")
        why = trial.user_attrs.get(WEIGHTS_NOT_KEPT)
        why = "" if why is None else f" (the weights folder could not be written: {why})"
        return f"- weights: not kept{why}; to export the trial, re-running its fine-tune (seed {seed}):{command}"
    return "- weights: none"


def export_command(study_name: str, storage: str | None) -> str:
    """``python -m ranksearch export --study-name NAME`` (and ``--storage URL``, its password hidden, unless it is
    the default one): what a user pastes to export a trial of this study."""
    command = f"python -m ranksearch export --study-name {study_name}"
    if storage is None or storage == default_storage_url(study_name):
        return command
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(storage).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses (a test's storage object, say): leave it out
        return command
    return f"{command} --storage {shown}"


def study_note(config_fields: dict, baseline: dict, data: dict, objectives: list[str]) -> str:
    """The Markdown of a study's note."""
    costs = ", ".join(f"{COSTS[name].label} (minimise)" for name in objectives[1:] if name in COSTS)
    goal = f"the best val accuracy within budget {config_fields['budget']}" if config_fields.get("budget") else (
        f"val accuracy (maximise) vs {costs}")  # fmt: skip
    lines = [f"## {config_fields.get('model', '?')} ranks: {goal}", ""]
    lines += [f"**Baseline**: val {baseline['val_accuracy']:.2%}, test {baseline['test_accuracy']:.2%}, "
              f"{baseline['macs']:,} MACs, {baseline['params']:,} params", ""]  # fmt: skip
    lines += ["Each trial's note gives its ranks as k/32 per module and its costs as ratios to the baseline's.", ""]
    lines += [f"**Data**: {', '.join(f'{k} {v}' for k, v in data.items())}", ""]
    lines += ["**Config**", "", "```json", json.dumps(config_fields, indent=1, sort_keys=True), "```"]
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
        save_trial_note(study, trial, trial_note(trial, self.modules, self.costs, self.export))
