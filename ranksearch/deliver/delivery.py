"""The delivered model: a run ends by refining its best few trials with export's refine recipe and writing the one
with the best refined val accuracy, verified as ``export`` verifies, in the formats asked.

A budget run delivers at its budget; a multi-objective run at each fraction of ``--deliver COST=F1,F2`` (the best
trials with that cost at or under F of the baseline's). The candidates are the ``deliver_top`` best COMPLETE trials
by val accuracy (in budget mode: at the top rung, the fidelity nearest the refine); each is rebuilt from its kept
weights (or its fine-tune re-run), refined ``deliver_epochs`` epochs with a checkpoint per epoch, and measured on val
(which picks) and test (which is shown, never used).

The study records the delivery before its first refine (``PENDING``) and clears it once the files are written
(``DELIVERED`` records what was written). A run killed in between leaves it pending: the same command then finishes
it, every candidate's refine resuming from its last epoch, and adds no trials (a command that delivers nothing,
``--deliver none``, drops it and runs its trials).
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import optuna
from torch import nn

from ..data.datasets import DeviceData
from ..models import ranks_text
from ..objectives.latency import SPEED_BATCH, measured_speed, speedups_of, speedups_text
from ..objectives.registry import COSTS
from ..search.trial import trial_seed
from ..study.config import Config, parse_deliver
from ..study.storage import sqlite_path
from ..utils.errors import UserError
from ..utils.files import check_writable
from .export import check_out, model_metadata, output_paths, rebuilt_and_verified, refined, require_onnx, write_locked
from .refine import RefineRecipe

PENDING = "delivery_pending"  # study user attr: the delivery a run began and has not finished
DELIVERED = "delivered"  # study user attr: what the last delivery wrote, one record per target
COMPLETE = optuna.trial.TrialState.COMPLETE


@dataclass(frozen=True)
class Target:
    """Deliver the best model with ``cost`` at or under ``fraction`` of the baseline's."""

    cost: str
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.cost}={self.fraction:g}"


def targets(config: Config) -> list[Target]:
    """What the run delivers: its budget (budget mode), ``deliver``'s fractions, or nothing (``deliver`` none)."""
    if config.deliver == "none":
        return []
    if config.budget is not None:
        return [Target(config.budget_cost(), config.budget_ratio())]
    if config.deliver is None:
        return []
    cost, fractions = parse_deliver(config.deliver)
    return [Target(cost, fraction) for fraction in fractions]


def default_out(config: Config) -> Path:
    """Beside a SQLite study's database, ``<study_name>-delivered.pt``; for a server storage, in ``studies/``."""
    database = sqlite_path(config.storage_url())
    folder = database.parent if database is not None else Path("studies")
    return folder / f"{config.study_name}-delivered.pt"


def target_paths(config: Config, wanted: list[Target]) -> dict[str, dict[str, Path]]:
    """Each target's files (format -> path): ``deliver_out`` (or ``default_out``) for one target; with several, its
    name with ``-<cost><fraction>`` added for each (``best.pt``: ``best-macs0.2.pt``, ``best-macs0.1.pt``)."""
    out = Path(config.deliver_out) if config.deliver_out else default_out(config)
    if len(wanted) == 1:
        return {wanted[0].label: output_paths(out, config.deliver_formats)}
    named = out.with_suffix("") if out.suffix in (".pt", ".onnx", ".ts") else out
    return {
        t.label: output_paths(named.with_name(f"{named.name}-{t.cost}{t.fraction:g}.pt"), config.deliver_formats)
        for t in wanted
    }


def check_delivery(config: Config) -> None:
    """Before the study is written: each target's files can be written (``export.check_out``) and ONNX, when asked
    for, can be checked; the folder is made when missing."""
    wanted = targets(config)
    if not wanted:
        return
    if "onnx" in config.deliver_formats:
        require_onnx()
    for paths in target_paths(config, wanted).values():
        paths["pt"].parent.mkdir(parents=True, exist_ok=True)
        check_writable(paths["pt"].parent, "the --out folder")
        check_out(paths["pt"], config.deliver_formats, refine=config.deliver_epochs > 0)


def plan(config: Config, run_id: str) -> dict:
    """The delivery as the study records it while pending: enough for the same command to finish it."""
    wanted = targets(config)
    return {
        "run_id": run_id, "targets": [dataclasses.asdict(t) for t in wanted], "top": config.deliver_top,
        "epochs": config.deliver_epochs, "formats": list(config.deliver_formats),
        "paths": {label: str(paths["pt"]) for label, paths in target_paths(config, wanted).items()},
    }  # fmt: skip


def candidates(study: optuna.Study, target: Target, top: int) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` best COMPLETE trials by val accuracy with the target's cost at or under its fraction, one per rank
    vector (a copied trial is its original's twin), ties by trial number."""
    attr = COSTS[target.cost].ratio_attr
    fitting = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
               if t.user_attrs.get(attr, float("inf")) <= target.fraction + 1e-12]  # fmt: skip
    chosen, seen = [], set()
    for trial in sorted(fitting, key=lambda t: (-t.values[0], t.number)):
        key = tuple(sorted(trial.params.items()))
        if key not in seen:
            seen.add(key)
            chosen.append(trial)
    return chosen[:top]


def candidate_checkpoint(pt: Path, number: int) -> Path:
    """Where candidate trial ``number``'s refine keeps its per-epoch checkpoint: beside the delivered .pt."""
    return pt.with_name(f"{pt.name}.trial{number}.refine.pt")


def _say(line: str) -> None:
    print(f"deliver: {line}", flush=True)


@dataclass
class Refined:
    trial: optuna.trial.FrozenTrial
    model: nn.Module
    source: str
    before: dict[str, float]
    scores: dict[str, float]
    record: dict


def refine_candidate(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData, teacher: nn.Module,
    weights: Path, epochs: int, checkpoint: Path,
) -> Refined:  # fmt: skip
    """One candidate rebuilt, verified and refined (resuming its checkpoint) with export's default recipe."""
    model, source, before = rebuilt_and_verified(study, trial, config, data, weights)
    if epochs == 0:
        return Refined(trial, model, source, before, before, {})
    seed = trial_seed(config, trial.number) + 1  # as export refines it
    hint = "the default refine diverged on this model; export it with --finetune-epochs E and a --refine-lr below"
    scores, record = refined(model, data, config, epochs, seed, RefineRecipe(), teacher, checkpoint, before, hint)
    return Refined(trial, model, source, before, scores, record)


def deliver_target(
    study: optuna.Study, config: Config, data: DeviceData, teacher: nn.Module, weights: Path, target: Target,
    paths: dict[str, Path],
) -> dict | None:  # fmt: skip
    """Refine the target's candidates and write the best by refined val to ``paths`` (format -> file); what was
    written (None: no trial fits)."""
    chosen = candidates(study, target, config.deliver_top)
    if not chosen:
        _say(f"no complete trial has {target.label} or less; nothing delivered for it")
        return None
    epochs = config.deliver_epochs
    listing = ", ".join(f"trial {t.number} (val {t.values[0]:.2%})" for t in chosen)
    _say(f"{target.label}: refining the best {len(chosen)} ({listing}) {epochs} epochs each; the best refined val "
         "is delivered")  # fmt: skip
    best, rows = None, []
    for trial in chosen:
        done = refine_candidate(study, trial, config, data, teacher, weights, epochs,
                                candidate_checkpoint(paths["pt"], trial.number))  # fmt: skip
        rows.append({
            "trial": trial.number, "ranks": ranks_text(trial.params.values()), "val_searched": trial.values[0],
            "val_refined": done.scores["val_accuracy"], "test_refined": done.scores["test_accuracy"],
        })  # fmt: skip
        if best is None or done.scores["val_accuracy"] > best.scores["val_accuracy"]:
            best = done
    extra = {"delivered": {"target": target.label, "chosen_by": "refined val accuracy", "candidates": rows}}
    if best.record:
        extra["refine"] = best.record
    extra["speed"] = measured_speed(best.model, teacher, data.spec.shape(), data.device, SPEED_BATCH)
    metadata = model_metadata(study, best.trial, config, best.model, data, best.scores, best.before, best.source,
                              epochs, extra)  # fmt: skip
    write_locked(best.model, paths, metadata, data.spec.shape())
    for row in rows:
        candidate_checkpoint(paths["pt"], row["trial"]).unlink(missing_ok=True)
    baseline = study.user_attrs["baseline"]
    _say(f"{target.label}: delivered trial {best.trial.number} (ranks {ranks_text(best.trial.params.values())}, "
         f"MACs {metadata['macs_ratio']:.3f}x): val {best.scores['val_accuracy']:.2%}, test "
         f"{best.scores['test_accuracy']:.2%} (baseline: val {baseline['val_accuracy']:.2%}, test "
         f"{baseline['test_accuracy']:.2%}){speedups_text(speedups_of(extra['speed']))} -> {paths['pt']}")  # fmt: skip
    return {"target": target.label, "trial": best.trial.number, "path": str(paths["pt"]), "epochs": epochs,
            "val_accuracy": best.scores["val_accuracy"], "test_accuracy": best.scores["test_accuracy"],
            "macs_ratio": metadata["macs_ratio"], "speedup": speedups_of(extra["speed"]),
            "candidates": rows}  # fmt: skip


def deliver(study: optuna.Study, config: Config, data: DeviceData, teacher: nn.Module, weights: Path,
            run_id: str) -> list[dict]:  # fmt: skip
    """Deliver what ``config`` asks (``targets``, to ``target_paths``), recorded as pending in the study until it is
    done: every target's model written, the study's ``DELIVERED`` set and ``PENDING`` cleared. A user's error (a
    refine that diverged) clears it too, so that the next run adds trials; an interruption leaves it, for the next
    run to finish. Where the files go comes from the command, never from the study (a study's records are no
    place to take a path to write to from)."""
    wanted = targets(config)
    paths = target_paths(config, wanted)
    study.set_user_attr(PENDING, plan(config, run_id))
    try:
        written = [deliver_target(study, config, data, teacher, weights, target, paths[target.label])
                   for target in wanted]  # fmt: skip
    except UserError:
        study.set_user_attr(PENDING, None)
        raise
    written = [record for record in written if record is not None]
    study.set_user_attr(DELIVERED, written)
    study.set_user_attr(PENDING, None)
    return written


def pending(study: optuna.Study) -> dict | None:
    """The delivery a run began in ``study`` and did not finish, or None."""
    recorded = study.user_attrs.get(PENDING)
    return recorded if isinstance(recorded, dict) else None


def finishing_line(config: Config) -> str:
    paths = ", ".join(str(p["pt"]) for p in target_paths(config, targets(config)).values())
    return (f"deliver: finishing the delivery that a stopped run began ({paths}); "
            "this run adds no trials: run the command again to add them")  # fmt: skip
