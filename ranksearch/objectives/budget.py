"""A budget's text, in one place: ``--budget macs=0.1`` is a cost and a fraction of the baseline's
(``parse_budget``), recorded in one spelling (``canonical_budget``); and budget mode's rungs, the fine-tune's step
counts at which a trial's val accuracy is reported to the pruner (``rungs``). How a budget run draws and prunes its
trials: ``ranksearch.search.samplers``."""

import math

from ..utils.errors import UserError
from .registry import BUILT_IN

REDUCTION_FACTOR = 3  # each rung has this many times the steps of the one before; about 1/3 of trials go on
RUNGS = 3  # rungs by default: finetune_steps x 1, 3, 9 (max_finetune_steps unset)


def parse_budget(text: str) -> tuple[str, float]:
    """``macs=0.1`` as ("macs", 0.1): a cost and a fraction of the baseline's, in (0, 1]."""
    name, sep, value = text.partition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not sep or name.strip() not in BUILT_IN or not (0 < ratio <= 1):
        raise UserError(
            f"budget must be COST=FRACTION with COST one of {', '.join(BUILT_IN)} and FRACTION in (0, 1] of the "
            f"baseline's cost (e.g. --budget macs=0.1), got {text!r}"
        )
    return name.strip(), ratio


def canonical_budget(text: str) -> str:
    """The budget ``text`` in one spelling per value: ``macs=.3``, ``macs=0.30`` and `` macs=0.3`` as ``macs=0.3``
    (a study records it; resuming it compares budgets by value)."""
    cost, ratio = parse_budget(text)
    return f"{cost}={ratio!r}"


def rungs(first: int, top: int | None, factor: int = REDUCTION_FACTOR) -> list[int]:
    """The fine-tune's step counts at the end of each rung: ``first``, ``first`` x ``factor``, ... up to ``top``
    (which ends the last rung when it falls between two); ``top`` None: ``RUNGS`` rungs; ``top`` 0 or at most
    ``first``: the fine-tune alone, one rung."""
    if top is None:
        top = first * factor ** (RUNGS - 1)
    marks = [first]
    while first > 0 and marks[-1] < top:
        marks.append(min(top, marks[-1] * factor))
    return marks
