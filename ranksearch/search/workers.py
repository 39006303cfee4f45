"""Many workers on one study: who a worker is, how `run --workers N` starts and watches them, and how trials
that a crash or a signal cut short are run again.

- A `run` is one run id; each of its processes is a worker (index 0..N-1, then replacements). Every trial it
  starts is tagged with both, so the run knows how many of its asked trials are done, whichever worker did them.
- A worker killed outright (kill -9) leaves its trial RUNNING; the storage's heartbeat fails it after
  2 x ``heartbeat_seconds`` (its ``fail_reason`` says so) and Optuna's retry callback enqueues it again with the
  same ranks (``retry_of``; ``study.HeartbeatStorage``). The parent of
  `run --workers N` then starts a replacement for the trials still owed.
- Ctrl-C or SIGTERM records the running trial as FAIL with reason ``interrupted``; the next `run` enqueues it
  again (``requeue_interrupted``). A parent of workers passes SIGTERM on to each (``run_workers``), and on Linux a
  worker whose parent dies (kill -9 included) gets SIGTERM from the kernel: no worker runs on orphaned.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from ..study.attrs import FAIL_REASON, HEARTBEAT_FAILED, INTERRUPTED, RETRY_OF
from ..study.config import WORKER_STORAGE_ENV
from ..study.storage import storage_failure
from ..utils.errors import UserError
from ..utils.interrupts import Signals as _Signals

FAIL = optuna.trial.TrialState.FAIL
COMPLETE = optuna.trial.TrialState.COMPLETE
PRUNED = optuna.trial.TrialState.PRUNED


@dataclass(frozen=True)
class Worker:
    run_id: str  # one per `run` command, shared by its workers
    index: int  # 0..N-1 (replacements continue the count)
    total: int  # trials the run asked for, all workers together
    threads: int = 0  # torch threads of this worker; 0: torch's default

    def text(self) -> str:
        return f"{self.run_id}:{self.index}:{self.total}:{self.threads}"

    @classmethod
    def parse(cls, text: str) -> "Worker":
        """``text()``'s RUN:INDEX:TOTAL:THREADS (what `run --workers N` passes its workers); a UserError otherwise."""
        try:
            run_id, index, total, threads = text.split(":")
            worker = cls(run_id, int(index), int(total), int(threads))
        except ValueError:
            worker = None
        if worker is None or not worker.run_id or min(worker.index, worker.total, worker.threads) < 0:
            raise UserError(f"--worker {text!r} is internal to `run --workers N` (RUN:INDEX:TOTAL:THREADS); "
                            "drop it and pass --workers N")  # fmt: skip
        return worker


def new_run(total: int) -> Worker:
    """The worker of a one-process run (also the parent of a multi-worker one)."""
    return Worker(uuid.uuid4().hex[:8], 0, total)


def tagged(objective: Callable[[optuna.Trial], tuple], worker: Worker) -> Callable[[optuna.Trial], tuple]:
    """``objective`` with each trial tagged by run and worker, and Ctrl-C / SIGTERM recorded as ``interrupted``."""

    def run(trial: optuna.Trial) -> tuple:
        _Signals.in_trial = True
        try:
            trial.set_user_attr("run_id", worker.run_id)
            trial.set_user_attr("worker", worker.index)
            trial.set_user_attr("pid", os.getpid())
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_REASON, INTERRUPTED)
            raise
        finally:
            _Signals.in_trial = False

    return run


def _interrupt(signum, frame) -> None:
    """Only a flag (``ranksearch.utils.interrupts``): inside a trial, the next training step or evaluation batch stops
    it (recorded as interrupted); between trials, no next one starts. Never an exception here, where it could land
    inside a library callback and be swallowed."""
    _Signals.pending = True


def _stop_if_signalled(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
    """Optuna callback: no further trial after a signal that came between trials."""
    if _Signals.pending:
        study.stop()


class _Finished:
    """Optuna callback: counts the trials this process finished (told)."""

    def __init__(self):
        self.count = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.count += 1


def _lost_race(error: Exception) -> bool:
    """Two workers popped one queued trial (SQLite has no row locks, so its queue can hand a trial out twice) and
    the other told it first: Optuna says ``Cannot tell a COMPLETE trial`` when that was before this worker's tell
    began, ``UpdateFinishedTrialError`` when it was during it. The other worker's result stands."""
    return isinstance(error, optuna.exceptions.UpdateFinishedTrialError) or str(error).startswith("Cannot tell a ")


def optimize_share(study: optuna.Study, objective: Callable, worker: Worker, trials: int, callbacks: list) -> None:
    """Run ``trials`` trials of ``objective`` tagged for ``worker``; Ctrl-C and SIGTERM end it cleanly (the
    running trial is recorded as interrupted) with KeyboardInterrupt. A queued trial another worker took at the
    same instant is not counted: this worker goes on with the next."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    finished = _Finished()
    while finished.count < trials and not _Signals.pending:
        try:
            study.optimize(tagged(objective, worker), n_trials=trials - finished.count, catch=(Exception,),
                           callbacks=[*callbacks, finished, _stop_if_signalled])  # fmt: skip
            break
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
            if not _lost_race(error):
                raise
            print(f"ranksearch: w{worker.index}: a queued trial it took was run by another worker at the same moment "
                  "(that result is kept); going on with the next", flush=True)  # fmt: skip
        except Exception as error:
            why = storage_failure(error)
            if why is None:
                raise
            raise UserError(
                f"cannot write to the study's storage any more ({why}); run again once it works (its server up, "
                "its file writable): the trial left running is failed by the heartbeat and run again"
            ) from None
    if _Signals.pending:
        raise KeyboardInterrupt


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def done_in_run(trials: list[optuna.trial.FrozenTrial], run_id: str) -> list[optuna.trial.FrozenTrial]:
    """The run's trials that ran to an end of their own: COMPLETE, PRUNED, or FAIL with a reason other than an
    interrupt.

    A trial failed by the heartbeat (its worker died) or interrupted is not done: it is run again.
    """
    return [
        t
        for t in trials
        if t.state in (COMPLETE, FAIL, PRUNED) and t.user_attrs.get("run_id") == run_id and not _runs_again(t)
    ]


def _runs_again(trial: optuna.trial.FrozenTrial) -> bool:
    """A FAIL trial that is run again: interrupted, or failed by the heartbeat (recorded with a reason that says so,
    or none: another process may read the trial between its failing and its reason)."""
    reason = trial.user_attrs.get(FAIL_REASON, INTERRUPTED)
    return trial.state == FAIL and (reason == INTERRUPTED or reason.startswith(HEARTBEAT_FAILED))


def _interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == FAIL and trial.user_attrs.get(FAIL_REASON) == INTERRUPTED


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Enqueue, with the same ranks, every interrupted trial not enqueued again yet; returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    again = {t.user_attrs.get(RETRY_OF) for t in trials}
    interrupted = [t for t in trials if _interrupted(t) and t.number not in again]
    for trial in interrupted:
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
    return [t.number for t in interrupted]


def shares(total: int, workers: int) -> list[int]:
    """``total`` trials split over ``workers`` as evenly as possible (no worker gets 0 when total >= workers)."""
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers) if i < total]


def worker_threads(workers: int, threads: int = 0) -> int:
    """The torch threads each of ``workers`` worker processes runs with: ``threads`` (``--threads``) when set, else
    the CPU cores split among them, beside a GPU too, where a worker's CPU work (the sampler's fit, the
    decomposition) runs while the others train."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def _env(worker: Worker, gpus: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(worker.threads, 1))}  # a worker's share: no oversubscription
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(worker.index % gpus)  # worker i on GPU i mod G
    return env


PR_SET_PDEATHSIG = 1  # prctl(2): the signal the kernel sends this process when its parent dies


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` after which the kernel sends the worker SIGTERM when the parent dies, however it
    dies (kill -9 included; the worker then records its trial as interrupted); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def follow() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before prctl: no signal will come
            os._exit(128 + signal.SIGTERM)

    return follow


def storage_aside(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without its ``--storage URL`` and the environment that carries the URL instead: a command line is
    visible to every user of the machine (``ps``), and the URL may hold a password."""
    kept, env, args = [], {}, iter(argv)
    for arg in args:
        if arg == "--storage":
            env[WORKER_STORAGE_ENV] = next(args, "")
        elif arg.startswith("--storage="):
            env[WORKER_STORAGE_ENV] = arg.removeprefix("--storage=")
        else:
            kept.append(arg)
    return kept, env


def _start(argv: list[str], worker: Worker, quota: int, gpus: int) -> subprocess.Popen:
    argv, storage = storage_aside(argv)
    command = [sys.executable, "-m", "ranksearch", *argv, "--workers", "1", "--trials", str(quota),
               "--worker", worker.text()]  # fmt: skip
    return subprocess.Popen(command, env=_env(worker, gpus) | storage, start_new_session=True,  # Ctrl-C: the parent
                            preexec_fn=_die_with_parent())  # fmt: skip


def _died(process: subprocess.Popen) -> bool:
    """True when the worker was killed (or crashed hard), as opposed to ending with 0, 1 (trials failed, or an
    error it printed) or 2 (a user's mistake)."""
    return process.returncode not in (0, 1, 2)


def run_workers(argv: list[str], parent: Worker, workers: int, gpus: int, owed: Callable[[], int],
                grace_seconds: float, threads: int = 0) -> None:  # fmt: skip
    """Start ``workers`` processes sharing the run's trials and wait for them. While trials are still ``owed()``
    when they have ended (a worker died or crashed, or two told one queued trial), one more worker runs them: after
    ``grace_seconds`` when a worker died, so that the heartbeat has failed its trial and enqueued it again.

    Ctrl-C and SIGTERM (both raise KeyboardInterrupt here, whatever handlers the caller had set) send SIGTERM to
    every worker, wait for them, then raise KeyboardInterrupt."""
    threads = worker_threads(workers, threads)
    team = [Worker(parent.run_id, i, parent.total, threads) for i in range(workers)]
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    processes: list[subprocess.Popen] = []
    try:
        for w, quota in zip(team, shares(parent.total, workers), strict=False):
            processes.append(_start(argv, w, quota, gpus))
        for _ in range(workers + 1):  # at most one round of replacements per worker, and the first round
            for process in processes:
                process.wait()
            if owed() <= 0 or any(p.returncode == 2 for p in processes):  # 2: a user's mistake, the same for all
                return
            if any(_died(p) for p in processes):
                print(f"ranksearch: a worker died; replacing it in {grace_seconds:.0f} s", file=sys.stderr, flush=True)
                time.sleep(grace_seconds)  # the heartbeat fails its trial, which is enqueued again
            else:
                print(f"ranksearch: {owed()} trial(s) still owed; starting a worker for them", file=sys.stderr,
                      flush=True)  # fmt: skip
            team.append(Worker(parent.run_id, len(team), parent.total, threads))
            processes = [_start(argv, team[-1], owed(), gpus)]
    except KeyboardInterrupt:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # each records its trial as interrupted
        for process in processes:
            process.wait()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
