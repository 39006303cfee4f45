"""The names a study's trials are recorded under, in one place: parameters and the user attrs that more than one
module writes or reads (a trial's costs are named by their specs, in ``ranksearch.objectives``)."""

RANK_PREFIX = "rank_"  # a trial's parameter per module: rank_block1, rank_stage2.0.conv1
FAIL_REASON = "fail_reason"  # user attr of a FAIL trial: why ("ValueError: ...", INTERRUPTED, HEARTBEAT_FAILED ...)
INTERRUPTED = "interrupted"  # the fail reason of a trial cut short by Ctrl-C or SIGTERM
HEARTBEAT_FAILED = "heartbeat:"  # how the fail reason of a trial whose worker died (no heartbeat) starts
RETRY_OF = "retry_of"  # user attr of a trial enqueued to re-run an interrupted or heartbeat-failed one
COPIED_FROM = "copied_from"  # user attr of a copied trial: the number of the trial it copied
WEIGHTS_ATTR = "weights_artifact_id"  # user attr of a trial whose weights are kept: their artifact's id
WEIGHTS_NOT_KEPT = "weights_not_kept"  # user attr of a COMPLETE trial whose weights could not be saved: why


def param_name(module: str) -> str:
    """The parameter holding ``module``'s rank: ``rank_block1``."""
    return f"{RANK_PREFIX}{module}"


def module_of(param: str) -> str:
    """The module a rank parameter ranks: ``block1`` of ``rank_block1``."""
    return param.removeprefix(RANK_PREFIX)
