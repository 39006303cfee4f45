"""Fine-tuned weights of trials, kept as Optuna artifacts while the trial is on the Pareto front.

Dominated trials lose their weights (200 trials must not fill the disk); export re-runs their fine-tune
from the recorded seed instead. Several workers may prune one study at once (see ``WeightsStore.prune``).
"""

import pickle
import tempfile
import uuid
import warnings
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from torch import nn

from ..objectives.registry import dominated
from ..utils.errors import first_line
from .attrs import WEIGHTS_ATTR

COMPLETE = optuna.trial.TrialState.COMPLETE


def is_weights_id(artifact_id: object) -> bool:
    """Whether ``artifact_id`` has the form of the ids this store writes (a UUID, as ``upload_artifact`` makes it),
    so that it names a file in the weights folder: an id from a study's records with a ``/``, ``..`` or an absolute
    path in it is no weights file of ours."""
    try:
        return isinstance(artifact_id, str) and str(uuid.UUID(artifact_id)) == artifact_id
    except ValueError:
        return False


class DamagedWeights(Exception):
    """Kept weights that cannot be loaded as plain tensors; the message says so in our words (torch's own text
    advises ``weights_only=False``, which would run whatever a planted file holds: never)."""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)``; ``DamagedWeights`` when the file is not a torch file of tensors."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a planted pickle, refused just below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedWeights("not a file of plain tensors (it holds other objects, or is no torch file); nothing "
                             "in it was run") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError) as error:
        raise DamagedWeights(f"truncated or no torch file ({type(error).__name__})") from None


class WeightsStore:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory).resolve()  # created by the first save: reading creates nothing
        self.store = FileSystemArtifactStore(self.directory)

    def save(self, trial: optuna.Trial, model: nn.Module) -> str | None:
        """Upload the trial's state_dict and record its artifact id in a user attr. Returns None, or why the
        weights could not be kept (the folder became unwritable or full: "Permission denied"): the trial's
        measured values are worth more than its weights, which export can make again (``trial.keep_weights``)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"trial-{trial.number}.pt"
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
                artifact_id = upload_artifact(
                    artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                    mimetype="application/octet-stream",  # a torch file; guessing from ".pt" says "page table"
                )  # fmt: skip
        except (OSError, RuntimeError) as error:  # RuntimeError: torch.save's failed write
            return first_line(error)
        trial.set_user_attr(WEIGHTS_ATTR, artifact_id)
        return None

    def load(self, trial: optuna.trial.FrozenTrial) -> dict[str, torch.Tensor] | None:
        """The trial's state_dict, or None when its weights were not kept; ``DamagedWeights`` when the file is
        not one torch loads with ``weights_only``."""
        artifact_id = trial.user_attrs.get(WEIGHTS_ATTR)
        if not is_weights_id(artifact_id):
            return None
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "weights.pt"
            try:
                download_artifact(artifact_store=self.store, file_path=str(path), artifact_id=artifact_id)
            except ArtifactNotFound:
                return None
            return load_tensors(path)

    def prune(self, study: optuna.Study, keep_best: int = 1) -> None:
        """Delete the weights of every complete trial that is not on the Pareto front (in a single-objective study:
        not among the ``keep_best`` best values, ties kept, which a delivery refines).

        Safe while other workers finish trials and prune the same study: the front is computed from ONE read of
        the trials, and a trial dominated there stays dominated as trials are added, so no prune deletes the
        weights of a trial on the front of that read or any later one; a trial that finished after the read is
        not touched. A copied trial (``trial.copy_result``) points at its original's weights; with equal values,
        both are on the front or neither is.

        Optuna cannot delete the artifact record of a finished trial, so the dashboard still lists a pruned
        trial's weights: downloading them answers 404 with the reason (``dashboard.WeightsStores``), and export
        re-runs the trial's fine-tune from its recorded seed.
        """
        trials = study.get_trials(deepcopy=False, states=(COMPLETE,))
        for trial in unkept(trials, study.directions, keep_best):
            artifact_id = trial.user_attrs.get(WEIGHTS_ATTR)
            if is_weights_id(artifact_id):
                try:
                    self.store.remove(artifact_id)
                except ArtifactNotFound:
                    pass  # removed earlier, by this worker or another
                except OSError:
                    pass  # an unwritable folder (the run said so when a save failed): a later prune removes them


def unkept(trials: list[optuna.trial.FrozenTrial], directions: list, keep_best: int) -> list[optuna.trial.FrozenTrial]:
    """The trials whose weights go: those another dominates; in a single-objective study, those below the
    ``keep_best``-th best value (a trial below it at one read stays below it as trials are added)."""
    if len(directions) > 1 or keep_best <= 1 or not trials:
        return dominated(trials, directions)
    sign = 1 if directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    values = sorted((sign * t.values[0] for t in trials), reverse=True)
    threshold = values[min(keep_best, len(values)) - 1]
    return [t for t in trials if sign * t.values[0] < threshold]
