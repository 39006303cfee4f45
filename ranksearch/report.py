"""Reports of a finished (or running) study: a table of every trial, the Pareto plot (HTML and PNG), a summary.

Everything here reads the study only; nothing is trained or measured again. The PNG is drawn with matplotlib's
Agg backend, so no browser (kaleido/Chrome) is needed.
"""

import math
import re
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go

from .models import RANK_STEPS

COMPLETE = optuna.trial.TrialState.COMPLETE
FAIL = optuna.trial.TrialState.FAIL
RANK_PREFIX = "rank_"
RANK_SUFFIX = "_k32"  # column rank_block1_k32 = k, where the block's normalized rank is k/32
VALUE_COLUMNS = ["val_accuracy", "macs"]  # the trial's values (objectives), in order
ATTR_COLUMNS = ["params", "macs_ratio", "params_ratio"]
SECONDS_COLUMNS = ["decompose_s", "finetune_s", "eval_s", "count_s"]
MACS_BUDGETS = (0.10, 0.25)  # summary: best val accuracy within these fractions of the baseline's MACs
REPORT_FILES = ("trials.csv", "pareto.html", "pareto.png")


# ----- the table -------------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list:
    """Sort block2 before block10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def rank_params(study: optuna.Study) -> list[str]:
    """The study's rank parameters (``rank_block1`` ...), in block order."""
    names = {
        name for trial in study.get_trials(deepcopy=False) for name in trial.params if name.startswith(RANK_PREFIX)
    }
    return sorted(names, key=_natural_key)


def rank_column(param: str) -> str:
    return f"{param}{RANK_SUFFIX}"


def rank_steps(value: float | None) -> int | None:
    """A normalized rank as k of k/32 (None stays None)."""
    return None if value is None else round(value * RANK_STEPS)


def wall_seconds(trial: optuna.trial.FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return math.nan
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def baseline_of(study: optuna.Study) -> dict | None:
    """The study's baseline metrics ({val_accuracy, test_accuracy, macs, params}), or None if not recorded."""
    return study.user_attrs.get("baseline")


def _attr_values(trial: optuna.trial.FrozenTrial, baseline: dict | None) -> dict[str, float]:
    """val_accuracy and macs (the trial's values), params and the ratios (user attrs; from the baseline if absent)."""
    row = dict(zip(VALUE_COLUMNS, trial.values or [math.nan] * len(VALUE_COLUMNS), strict=True))
    row |= {key: trial.user_attrs.get(key, math.nan) for key in ATTR_COLUMNS}
    for key, base_key in (("macs_ratio", "macs"), ("params_ratio", "params")):
        if math.isnan(row[key]) and baseline and baseline.get(base_key):
            row[key] = row[base_key] / baseline[base_key]
    return row


def _trial_row(trial: optuna.trial.FrozenTrial, params: list[str], pareto: set[int], baseline: dict | None) -> dict:
    row = {"number": trial.number, "state": trial.state.name}
    row.update({rank_column(p): rank_steps(trial.params.get(p)) for p in params})
    row.update(_attr_values(trial, baseline))
    row.update({key: trial.user_attrs.get(key, math.nan) for key in SECONDS_COLUMNS})
    row["seconds"] = wall_seconds(trial)
    row["pareto"] = trial.number in pareto
    row["fail_reason"] = trial.user_attrs.get("fail_reason")
    return row


def table_columns(params: list[str]) -> list[str]:
    return ["number", "state", *map(rank_column, params), *VALUE_COLUMNS, *ATTR_COLUMNS, *SECONDS_COLUMNS,
            "seconds", "pareto", "fail_reason"]  # fmt: skip


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, every state.

    Rank columns ``rank_<module>_k32`` hold k, where the module's normalized rank is k/32 (nullable integers).
    ``seconds`` is the trial's wall time; ``pareto`` marks ``study.best_trials``. Missing values are NaN.
    """
    params = rank_params(study)
    pareto = pareto_numbers(study)
    baseline = baseline_of(study)
    rows = [_trial_row(t, params, pareto, baseline) for t in study.get_trials(deepcopy=False)]
    table = pd.DataFrame(rows, columns=table_columns(params))
    for param in params:
        table[rank_column(param)] = table[rank_column(param)].astype("Int64")
    return table.astype({"number": int, "pareto": bool})


def pareto_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.best_trials}


def complete_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The complete trials that have a MACs ratio (the plottable ones)."""
    return table[(table["state"] == COMPLETE.name) & table["macs_ratio"].notna()]


def ranks_text(row: pd.Series, params: list[str]) -> str:
    """``8/8/4/2/2 /32``: each module's rank as k of k/32."""
    return "/".join(str(row[rank_column(p)]) for p in params) + f" /{RANK_STEPS}"


def module_names(params: list[str]) -> str:
    return "/".join(p.removeprefix(RANK_PREFIX) for p in params)


# ----- the plot ----------------------------------------------------------------------------------------------------


OTHER_TRIALS_STYLE = {
    "mode": "markers",
    "marker": {"color": "lightgray", "size": 8, "line": {"color": "gray", "width": 1}},
}
FRONT_STYLE = {"mode": "lines+markers", "line": {"shape": "hv"}, "marker": {"color": "crimson", "size": 10}}


def plot_title(study: optuna.Study, front: pd.DataFrame, rows: pd.DataFrame) -> str:
    return f"{study.study_name}: {len(front)} Pareto trials of {len(rows)} complete"


def _hover_data(rows: pd.DataFrame, params: list[str]) -> list[list]:
    return [
        [int(r["number"]), ranks_text(r, params), f"{r['macs']:,.0f}", r["params_ratio"]] for _, r in rows.iterrows()
    ]


def _scatter(rows: pd.DataFrame, params: list[str], name: str, **style) -> go.Scatter:
    hover = (
        "trial %{customdata[0]}<br>ranks (" + module_names(params) + ") %{customdata[1]}<br>"
        "val %{y:.2f} %<br>MACs %{customdata[2]} (%{x:.3f}x)<br>params %{customdata[3]:.3f}x<extra></extra>"
    )
    return go.Scatter(
        x=rows["macs_ratio"],
        y=rows["val_accuracy"] * 100,
        name=name,
        customdata=_hover_data(rows, params),
        hovertemplate=hover,
        **style,
    )


def _baseline_trace(baseline: dict) -> go.Scatter:
    hover = f"baseline<br>val {baseline['val_accuracy']:.2%}<br>MACs {baseline['macs']:,.0f} (1x)<extra></extra>"
    return go.Scatter(
        x=[1.0],
        y=[baseline["val_accuracy"] * 100],
        name="baseline",
        mode="markers",
        marker={"symbol": "star", "size": 16, "color": "black"},
        hovertemplate=hover,
    )


def pareto_figure(study: optuna.Study) -> go.Figure:
    """Val accuracy (%) vs MACs ratio of every complete trial; the Pareto front joined by a step line."""
    params = rank_params(study)
    rows = complete_rows(trials_table(study)).sort_values("macs_ratio")
    front = rows[rows["pareto"]]
    figure = go.Figure()
    figure.add_trace(_scatter(rows[~rows["pareto"]], params, "trials", **OTHER_TRIALS_STYLE))
    figure.add_trace(_scatter(front, params, "Pareto front", **FRONT_STYLE))
    baseline = baseline_of(study)
    if baseline:
        figure.add_trace(_baseline_trace(baseline))
    figure.update_layout(
        title=plot_title(study, front, rows),
        xaxis={"title": "MACs / baseline MACs (log)", "type": "log"},
        yaxis={"title": "validation accuracy (%)"},
        template="plotly_white",
    )
    return figure


def _log_ratio_axis(axis) -> None:
    """A log axis labelled 0.05x, 0.1x, 0.2x, 0.5x, 1x (not 10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.set_minor_formatter(NullFormatter())


def pareto_png(study: optuna.Study, path: Path) -> Path:
    """The Pareto plot as a PNG, drawn with matplotlib (Agg; no browser needed)."""
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no GUI backend

    rows = complete_rows(trials_table(study)).sort_values("macs_ratio")
    front = rows[rows["pareto"]]
    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    others = rows[~rows["pareto"]]
    axes.scatter(others["macs_ratio"], others["val_accuracy"] * 100, c="lightgray", edgecolors="gray", label="trials")
    axes.step(
        front["macs_ratio"], front["val_accuracy"] * 100, where="post", c="crimson", marker="o", label="Pareto front"
    )
    for _, row in front.iterrows():
        point = (row["macs_ratio"], row["val_accuracy"] * 100)
        axes.annotate(str(row["number"]), point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    baseline = baseline_of(study)
    if baseline:
        axes.scatter([1.0], [baseline["val_accuracy"] * 100], marker="*", s=200, c="black", label="baseline")
    if len(rows) or baseline:
        _log_ratio_axis(axes.xaxis)
    axes.set(
        xlabel="MACs / baseline MACs (log)",
        ylabel="validation accuracy (%)",
        title=plot_title(study, front, rows),
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    path = Path(path)
    figure.savefig(path, format="png")
    return path


# ----- files and summary -------------------------------------------------------------------------------------------


def write_report(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write ``trials.csv``, ``pareto.html`` (self-contained, works offline) and ``pareto.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, html_path, png_path = (out_dir / name for name in REPORT_FILES)
    trials_table(study).to_csv(csv_path, index=False)
    pareto_figure(study).write_html(html_path, include_plotlyjs=True, full_html=True)
    pareto_png(study, png_path)
    return [csv_path, html_path, png_path]


def best_within(table: pd.DataFrame, max_macs_ratio: float) -> pd.Series | None:
    """The complete trial with the best val accuracy at <= ``max_macs_ratio`` of the baseline's MACs (ties: fewer
    MACs), or None."""
    rows = complete_rows(table)
    rows = rows[rows["macs_ratio"] <= max_macs_ratio + 1e-12]
    if rows.empty:
        return None
    return rows.sort_values(["val_accuracy", "macs_ratio"], ascending=[False, True]).iloc[0]


def _budget_line(table: pd.DataFrame, budget: float, params: list[str]) -> str:
    best = best_within(table, budget)
    head = f"best val accuracy at <= {budget:.0%} of baseline MACs:"
    if best is None:
        return f"{head} none"
    return (
        f"{head} {best['val_accuracy']:.2%} (trial {best['number']}, ranks {ranks_text(best, params)}, "
        f"MACs {best['macs_ratio']:.3f}x)"
    )


def _baseline_line(baseline: dict | None) -> str:
    if not baseline:
        return "baseline: not recorded in the study"
    return (
        f"baseline: val {baseline['val_accuracy']:.2%}, test {baseline['test_accuracy']:.2%}, "
        f"{baseline['macs']:,.0f} MACs, {baseline['params']:,.0f} params"
    )


def _counts_line(study: optuna.Study, table: pd.DataFrame) -> str:
    states = table["state"].value_counts()
    complete, failed = int(states.get(COMPLETE.name, 0)), int(states.get(FAIL.name, 0))
    other = len(table) - complete - failed
    extra = f", {other} other" if other else ""
    return f"study {study.study_name!r}: {len(table)} trials ({complete} complete, {failed} failed{extra})"


def summary(study: optuna.Study) -> str:
    """A few lines for the console: trial counts, Pareto front size, best accuracy within MACs budgets, baseline."""
    table = trials_table(study)
    params = rank_params(study)
    front = f"Pareto front: {int(table['pareto'].sum())} of {len(complete_rows(table))} complete trials"
    lines = [_counts_line(study, table), front]
    lines += [_budget_line(table, budget, params) for budget in MACS_BUDGETS]
    lines.append(_baseline_line(baseline_of(study)))
    return "\n".join(lines)
