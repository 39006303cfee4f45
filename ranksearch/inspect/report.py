"""Reports of a finished (or running) study: a table of every trial, the Pareto plot (HTML and PNG), a summary.

Everything here reads the study only; nothing is trained or measured again. The PNG is drawn with matplotlib's
Agg backend, so no browser (kaleido/Chrome) is needed.
"""

import math
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..models import rank_step, steps_text
from ..models.user_weights import digest_text
from ..objectives.budget import parse_budget
from ..objectives.latency import speedups_text
from ..objectives.registry import COST_BUDGETS, COSTS, best_within, cost, cost_ratio, study_objectives
from ..study.attrs import FAIL_REASON, RANK_PREFIX, module_of
from ..utils.errors import UserError
from ..utils.files import atomic_write
from .progress import trial_ranks_text

COMPLETE = optuna.trial.TrialState.COMPLETE
FAIL = optuna.trial.TrialState.FAIL
RANK_SUFFIX = "_k32"  # column rank_block1_k32 = k, where the block's normalized rank is k/32
ALWAYS_RECORDED = ("macs", "params")  # costs every trial records; other costs get columns once a trial has them
SECONDS_COLUMNS = ["decompose_s", "recalibrate_s", "finetune_s", "eval_s", "count_s", "latency_s"]
REPORT_FILES = ("trials.csv", "pareto.html", "pareto.png")


# ----- the table -------------------------------------------------------------------------------------------------


def rank_params(study: optuna.Study) -> list[str]:
    """The study's rank parameters (``rank_block1`` ...), in module order: the order trials draw them in (Optuna
    keeps it), which is not the names' order for every model (``rank_stem`` comes before ``rank_stage1``)."""
    names = (name for trial in study.get_trials(deepcopy=False) for name in trial.params)
    return list(dict.fromkeys(name for name in names if name.startswith(RANK_PREFIX)))


def rank_column(param: str) -> str:
    return f"{param}{RANK_SUFFIX}"


def wall_seconds(trial: optuna.trial.FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return math.nan
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def baseline_of(study: optuna.Study) -> dict | None:
    """The study's baseline metrics ({val_accuracy, test_accuracy, macs, params}), or None if not recorded."""
    return study.user_attrs.get("baseline")


def baseline_costs(study: optuna.Study) -> dict[str, float | None]:
    """The baseline's value of each cost (None where the study did not record it)."""
    baseline = baseline_of(study) or {}
    latency = study.user_attrs.get("baseline_latency_ms")
    registered = {name: study.user_attrs.get(m.baseline_attr) for name, m in COSTS.items() if m.measure}
    return {"macs": baseline.get("macs"), "params": baseline.get("params"), "latency": latency, **registered}


def ratio_column(name: str) -> str:
    """A cost's ratio to the baseline's, as trials record it: macs_ratio, params_ratio, latency_ratio."""
    return f"{name}_ratio"


def study_costs(study: optuna.Study) -> list[str]:
    """The costs the study minimises (the objectives after accuracy), in order."""
    return study_objectives(study)[1:]


def recorded_costs(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """The costs that get columns: MACs and params, the study's costs, and any cost a trial recorded."""
    wanted = {*ALWAYS_RECORDED, *study_costs(study)}
    return [n for n, m in COSTS.items() if n in wanted or any(m.attr in t.user_attrs for t in trials)]


def table_costs(table: pd.DataFrame) -> list[str]:
    """The costs a trials table has columns for."""
    return [name for name, metric in COSTS.items() if metric.attr in table.columns]


def _measured(trial: optuna.trial.FrozenTrial, objectives: list[str], costs: list[str], base: dict) -> dict:
    """val_accuracy and each cost, then each cost's ratio to the baseline's. An objective is read from the trial's
    values (what the Pareto front is made of), any other cost from its user attrs; a ratio the trial did not record
    is computed from the baseline's value."""
    values = dict(zip(objectives, trial.values or (), strict=False))
    row = {"val_accuracy": values.get("accuracy", math.nan)}
    for name in costs:
        value = values.get(name, cost(trial, name))
        row[COSTS[name].attr] = math.nan if value is None else value
    for name in costs:
        ratio = trial.user_attrs.get(ratio_column(name))
        if ratio is None and base[name]:
            ratio = row[COSTS[name].attr] / base[name]
        row[ratio_column(name)] = math.nan if ratio is None else ratio
    return row


def _trial_row(trial: optuna.trial.FrozenTrial, params: list[str], pareto: set[int]) -> dict:
    row = {"number": trial.number, "state": trial.state.name}
    row.update({rank_column(p): rank_step(trial.params.get(p)) for p in params})
    row.update({key: trial.user_attrs.get(key, math.nan) for key in SECONDS_COLUMNS})
    row["seconds"] = wall_seconds(trial)
    row["pareto"] = trial.number in pareto
    row[FAIL_REASON] = trial.user_attrs.get(FAIL_REASON)
    return row


def table_columns(params: list[str], costs: list[str]) -> list[str]:
    cost_columns = [COSTS[name].attr for name in costs] + [ratio_column(name) for name in costs]
    return ["number", "state", *map(rank_column, params), "val_accuracy", *cost_columns, *SECONDS_COLUMNS,
            "seconds", "pareto", "fail_reason"]  # fmt: skip


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, every state.

    Rank columns ``rank_<module>_k32`` hold k, where the module's normalized rank is k/32 (nullable integers).
    Then val accuracy, every cost recorded (``macs``, ``params``, ``latency_ms``) and its ratio to the baseline's.
    ``seconds`` is the trial's wall time; ``pareto`` marks ``study.best_trials``. Missing values are NaN.
    """
    params, pareto, objectives = rank_params(study), pareto_numbers(study), study_objectives(study)
    trials = study.get_trials(deepcopy=False)
    costs, base = recorded_costs(study, trials), baseline_costs(study)
    rows = [_trial_row(t, params, pareto) | _measured(t, objectives, costs, base) for t in trials]
    table = pd.DataFrame(rows, columns=table_columns(params, costs))
    for param in params:
        table[rank_column(param)] = table[rank_column(param)].astype("Int64")
    return table.astype({"number": int, "pareto": bool})


def pareto_numbers(study: optuna.Study) -> set[int]:
    return {t.number for t in study.best_trials}


def complete_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The complete trials."""
    return table[table["state"] == COMPLETE.name]


def row_ranks_text(row: pd.Series, params: list[str]) -> str:
    """``8/8/4/2/2 /32``: each module's rank as k of k/32."""
    return steps_text(row[rank_column(p)] for p in params)


def module_names(params: list[str]) -> str:
    return "/".join(module_of(p) for p in params)


# ----- the plot ----------------------------------------------------------------------------------------------------


OTHER_TRIALS_STYLE = {
    "mode": "markers",
    "marker": {"color": "lightgray", "size": 8, "line": {"color": "gray", "width": 1}},
}
FRONT_STYLE = {"mode": "lines+markers", "line": {"shape": "hv"}, "marker": {"color": "crimson", "size": 10}}
OFF_FRONT_STYLE = {"mode": "markers", "marker": {"color": "crimson", "size": 10, "symbol": "circle-open"}}
ACCURACY_TITLE = "validation accuracy (%)"


def axis_title(name: str) -> str:
    return f"{COSTS[name].label} / baseline's (log)"


def plot_title(study: optuna.Study, rows: pd.DataFrame) -> str:
    pareto = int(rows["pareto"].sum())
    return f"{study.study_name}: {pareto} Pareto trial{'' if pareto == 1 else 's'} of {len(rows)} complete"


def staircase(rows: pd.DataFrame, ratio: str) -> pd.DataFrame:
    """The rows no other row beats on both val accuracy and ``ratio`` (a panel's 2-D front), by increasing ratio.
    Of rows equal on both, a Pareto one is kept, so every row of the staircase is a Pareto trial of the study."""
    order = [ratio, "val_accuracy", "pareto", "number"]
    rows = rows.sort_values(order, ascending=[True, False, False, True])
    best_before = rows["val_accuracy"].cummax().shift(fill_value=-math.inf)
    return rows[rows["val_accuracy"] > best_before]


def panel_rows(rows: pd.DataFrame, name: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The complete trials against cost ``name``: the non-Pareto ones, the 2-D front (staircase) and the study's
    other Pareto trials (Pareto by another cost, with 3 objectives)."""
    rows = rows[rows[ratio_column(name)].notna()]
    front = staircase(rows, ratio_column(name))
    on_front = rows.index.isin(front.index)
    return rows[~rows["pareto"] & ~on_front], front, rows[rows["pareto"] & ~on_front]


def _cost_texts(row: pd.Series, costs: list[str]) -> list[str]:
    """Each cost's value then its ratio, as text: ["100", "0.100x", "0.50 ms", "0.250x"]."""
    texts = []
    for name in costs:
        ratio = row[ratio_column(name)]
        texts += [COSTS[name].text(row[COSTS[name].attr]), "-" if pd.isna(ratio) else f"{ratio:.3f}x"]
    return texts


def _hover_data(rows: pd.DataFrame, params: list[str], costs: list[str]) -> list[list]:
    """Per trial: number, ranks, then each cost's value and ratio (``_cost_texts``)."""
    return [[int(r["number"]), row_ranks_text(r, params), *_cost_texts(r, costs)] for _, r in rows.iterrows()]


def _hover_template(params: list[str], costs: list[str]) -> str:
    lines = ["trial %{customdata[0]}", f"ranks ({module_names(params)}) %{{customdata[1]}}", "val %{y:.2f} %"]
    for i, name in enumerate(costs):
        lines.append(f"{COSTS[name].short} %{{customdata[{2 + 2 * i}]}} (%{{customdata[{3 + 2 * i}]}})")
    return "<br>".join(lines) + "<extra></extra>"


def _scatter(rows: pd.DataFrame, ratio: str, params: list[str], costs: list[str], name: str, **style) -> go.Scatter:
    return go.Scatter(
        x=rows[ratio],
        y=rows["val_accuracy"] * 100,
        name=name,
        customdata=_hover_data(rows, params, costs),
        hovertemplate=_hover_template(params, costs),
        **style,
    )


def _baseline_trace(baseline: dict, name: str, value: float | None) -> go.Scatter:
    cost_text = f"{COSTS[name].short} {COSTS[name].text(value)} (1x)"
    return go.Scatter(
        x=[1.0],
        y=[baseline["val_accuracy"] * 100],
        name="baseline",
        mode="markers",
        marker={"symbol": "star", "size": 16, "color": "black"},
        hovertemplate=f"baseline<br>val {baseline['val_accuracy']:.2%}<br>{cost_text}<extra></extra>",
    )


def budget_of(study: optuna.Study) -> tuple[str, float] | None:
    """A budget study's (cost, fraction of the baseline's), else None (also for a record that is no budget: the
    study may be anyone's)."""
    config = study.user_attrs.get("config")
    budget = config.get("budget") if isinstance(config, dict) else None
    try:
        return parse_budget(budget) if isinstance(budget, str) else None
    except UserError:
        return None


def _budget_trace(rows: pd.DataFrame, baseline: dict | None, fraction: float) -> go.Scatter:
    """The budget as a dashed vertical line across the panel's accuracies."""
    values = [*(rows["val_accuracy"] * 100), *([baseline["val_accuracy"] * 100] if baseline else [])]
    return go.Scatter(x=[fraction, fraction], y=[min(values), max(values)], name=f"budget {fraction:g}x",
                      mode="lines", line={"dash": "dash", "color": "royalblue"}, hoverinfo="name")  # fmt: skip


def _panel_traces(study: optuna.Study, table: pd.DataFrame, name: str) -> list[go.Scatter]:
    """The traces of the panel of cost ``name``: other trials, the 2-D front as a step line, other Pareto trials,
    the baseline."""
    params, costs, ratio = rank_params(study), table_costs(table), ratio_column(name)
    others, front, off_front = panel_rows(complete_rows(table), name)
    traces = [
        _scatter(others, ratio, params, costs, "trials", **OTHER_TRIALS_STYLE),
        _scatter(front, ratio, params, costs, "Pareto front", **FRONT_STYLE),
    ]
    if not off_front.empty:
        traces.append(_scatter(off_front, ratio, params, costs, "other Pareto trials", **OFF_FRONT_STYLE))
    baseline = baseline_of(study)
    if baseline:
        traces.append(_baseline_trace(baseline, name, baseline_costs(study)[name]))
    budget = budget_of(study)
    if budget is not None and budget[0] == name and not complete_rows(table).empty:
        traces.append(_budget_trace(complete_rows(table), baseline, budget[1]))
    return traces


def pareto_figure(study: optuna.Study) -> go.Figure:
    """Val accuracy (%) vs each cost's ratio to the baseline's, one panel per cost of the study: every complete
    trial, the Pareto trials highlighted, the panel's own front joined by a step line."""
    table, costs = trials_table(study), study_costs(study)
    figure = make_subplots(rows=1, cols=len(costs), shared_yaxes=True, horizontal_spacing=0.05)
    shown = set()
    for col, name in enumerate(costs, start=1):
        for trace in _panel_traces(study, table, name):
            trace.update(legendgroup=trace.name, showlegend=trace.name not in shown)
            shown.add(trace.name)
            figure.add_trace(trace, row=1, col=col)
        figure.update_xaxes(title=axis_title(name), type="log", row=1, col=col)
    figure.update_yaxes(title=ACCURACY_TITLE, row=1, col=1)
    figure.update_layout(title=plot_title(study, complete_rows(table)), template="plotly_white")
    return figure


def _log_ratio_axis(axis) -> None:
    """A log axis labelled 0.05x, 0.1x, 0.2x, 0.5x, 1x (not 10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.set_minor_formatter(NullFormatter())


def _draw_panel(axes, rows: pd.DataFrame, name: str, baseline: dict | None,
                budget: tuple[str, float] | None = None) -> None:  # fmt: skip
    """One matplotlib panel: val accuracy (%) vs the ratio of cost ``name``, as in ``pareto_figure``; a budget of
    that cost as a dashed line."""
    ratio = ratio_column(name)
    others, front, off_front = panel_rows(rows, name)
    axes.scatter(others[ratio], others["val_accuracy"] * 100, c="lightgray", edgecolors="gray", label="trials")
    axes.step(front[ratio], front["val_accuracy"] * 100, where="post", c="crimson", marker="o", label="Pareto front")
    if not off_front.empty:
        accuracy = off_front["val_accuracy"] * 100
        axes.scatter(off_front[ratio], accuracy, facecolors="none", edgecolors="crimson", label="other Pareto trials")
    for _, row in pd.concat([front, off_front]).iterrows():
        point = (row[ratio], row["val_accuracy"] * 100)
        axes.annotate(str(row["number"]), point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    if baseline:
        axes.scatter([1.0], [baseline["val_accuracy"] * 100], marker="*", s=200, c="black", label="baseline")
    if budget is not None and budget[0] == name:
        axes.axvline(budget[1], linestyle="--", color="royalblue", label=f"budget {budget[1]:g}x")
    if not front.empty or baseline:
        _log_ratio_axis(axes.xaxis)
    axes.set_xlabel(axis_title(name))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best")  # panels are narrow: a fixed corner may hide trials


def pareto_png(study: optuna.Study, path: Path) -> Path:
    """The Pareto plot as a PNG, a panel per cost, drawn with matplotlib (Agg; no browser needed)."""
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no GUI backend

    rows, costs = complete_rows(trials_table(study)), study_costs(study)
    figure = Figure(figsize=(3 + 5 * len(costs), 5), dpi=120, layout="constrained")  # 8 inches wide for one
    panels = figure.subplots(1, len(costs), sharey=True, squeeze=False)[0]
    for axes, name in zip(panels, costs, strict=True):
        _draw_panel(axes, rows, name, baseline_of(study), budget_of(study))
    panels[0].set_ylabel(ACCURACY_TITLE)
    figure.suptitle(plot_title(study, rows))
    path = Path(path)
    figure.savefig(path, format="png")
    return path


# ----- files and summary -------------------------------------------------------------------------------------------


def write_report(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write ``trials.csv``, ``pareto.html`` (self-contained, works offline) and ``pareto.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, html_path, png_path = (out_dir / name for name in REPORT_FILES)
    atomic_write(csv_path, lambda partial: trials_table(study).to_csv(partial, index=False))
    atomic_write(html_path, lambda partial: pareto_figure(study).write_html(partial, include_plotlyjs=True,
                                                                             full_html=True))  # fmt: skip
    atomic_write(png_path, lambda partial: pareto_png(study, partial))
    return [csv_path, html_path, png_path]


def _budget_line(study: optuna.Study, budget: float, modules: list[str], costs: list[str]) -> str:
    """The best val accuracy within ``budget`` of the baseline's first cost; the trial's every cost as a ratio."""
    best = best_within(study.get_trials(deepcopy=False), costs[0], budget)
    head = f"best val accuracy at <= {budget:.0%} of baseline {COSTS[costs[0]].short}:"
    if best is None:
        return f"{head} none"
    ratios = ", ".join(f"{COSTS[name].short} {cost_ratio(best, name):.3f}x" for name in costs)
    ranks = trial_ranks_text(best.params, modules)
    return f"{head} {best.values[0]:.2%} (trial {best.number}, ranks {ranks}, {ratios})"


def _latency_text(study: optuna.Study) -> str:
    """``, latency 1.92 ms (device cpu, cpu ..., threads 2, batch 1)``, or nothing when not measured."""
    latency = study.user_attrs.get("baseline_latency_ms")
    if latency is None:
        return ""
    where = ", ".join(f"{k} {v}" for k, v in (study.user_attrs.get("latency_device") or {}).items() if v is not None)
    return f", latency {latency:.2f} ms" + (f" ({where})" if where else "")


def _baseline_line(study: optuna.Study) -> str:
    baseline = baseline_of(study)
    if not baseline:
        return "baseline: not recorded in the study"
    return (
        f"baseline{_weights_text(study)}: val {baseline['val_accuracy']:.2%}, test {baseline['test_accuracy']:.2%}, "
        f"{baseline['macs']:,.0f} MACs, {baseline['params']:,.0f} params{_latency_text(study)}"
    )


def _weights_text(study: optuna.Study) -> str:
    """`` (your weights FILE, sha256 ...)`` for a study made from ``--weights``; empty for a pretrained baseline."""
    record = (study.user_attrs.get("config") or {}).get("weights")
    if not isinstance(record, dict):
        return ""
    file = study.user_attrs.get("weights_file")
    return f" (your weights{f' {file}' if file else ''}, {digest_text(record)})"


def _counts_line(study: optuna.Study, table: pd.DataFrame) -> str:
    states = table["state"].value_counts()
    complete, failed = int(states.get(COMPLETE.name, 0)), int(states.get(FAIL.name, 0))
    pruned = int(states.get("PRUNED", 0))
    other = len(table) - complete - failed - pruned
    extra = (f", {pruned} pruned" if pruned else "") + (f", {other} other" if other else "")
    return f"study {study.study_name!r}: {len(table)} trials ({complete} complete, {failed} failed{extra})"


def _best_line(study: optuna.Study, table: pd.DataFrame, params: list[str], costs: list[str]) -> str:
    """A budget study's best trial (every trial meets its budget)."""
    budget = study.user_attrs.get("config", {}).get("budget")
    rows = complete_rows(table)
    if rows.empty:
        return f"budget {budget}: no complete trial"
    best = rows.sort_values(["val_accuracy", "number"], ascending=[False, True]).iloc[0]
    ratios = ", ".join(f"{COSTS[name].short} {best[ratio_column(name)]:.3f}x" for name in costs)
    return (f"best val accuracy within budget {budget}: {best['val_accuracy']:.2%} (trial {best['number']}, "
            f"ranks {row_ranks_text(best, params)}, {ratios})")  # fmt: skip


def summary(study: optuna.Study) -> str:
    """A few lines for the console: trial counts, Pareto front size, best accuracy within budgets of the study's
    first cost, baseline."""
    table, params, costs = trials_table(study), rank_params(study), study_costs(study)
    if len(study.directions) == 1:  # a budget study
        lines = [_counts_line(study, table), _best_line(study, table, params, costs), _baseline_line(study)]
        return "\n".join(lines + _delivered_lines(study))
    front = f"Pareto front: {int(table['pareto'].sum())} of {len(complete_rows(table))} complete trials"
    lines = [_counts_line(study, table), front]
    modules = [module_of(p) for p in params]
    lines += [_budget_line(study, budget, modules, costs) for budget in COST_BUDGETS]
    lines.append(_baseline_line(study))
    return "\n".join(lines + _delivered_lines(study))


def _delivered_lines(study: optuna.Study) -> list[str]:
    """What the study's last delivery wrote (``deliver.DELIVERED``), a line per model."""
    return [f"delivered at {d['target']}: trial {d['trial']} refined {d['epochs']} epochs, val "
            f"{d['val_accuracy']:.2%}, test {d['test_accuracy']:.2%}, MACs {d['macs_ratio']:.3f}x"
            f"{speedups_text(d.get('speedup'))} -> {d['path']}"  # measured where it was delivered
            for d in study.user_attrs.get("delivered") or []]  # fmt: skip
