"""What the active scheduler does next for one job: a pure decision from its cursor and now.

The cursor is the last slot the job is done with (fired, or passed over on purpose); every
slot after it that has come due is either late or missed:

- a slot at most `GRACE` seconds old is late, not missed: it fires, on its own, in order (a
  scheduler that took over a few seconds ago fires the slots of those seconds);
- an older slot is missed: no scheduler ran when it fell due. ``misfire="once"`` fires one
  catch-up run (the latest missed slot) for any number of them, ``misfire="skip"`` fires
  none; either way no burst of runs follows an outage. When a late slot follows the missed
  ones, it is the catch-up run and the missed ones are passed over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cuebx.scheduling.schedules import Schedule

__all__ = ["GRACE", "Misfire", "Step", "decide"]

Misfire = Literal["once", "skip"]

#: Seconds after its time that a slot still fires as itself rather than counting as missed:
#: more than a failover takes (a dead scheduler's connection closes at once; a stopping one
#: hands over before it stops).
GRACE = 10


@dataclass(frozen=True, slots=True)
class Step:
    """One decision.

    Attributes:
        fire: the slot to publish now, or None.
        cursor: the cursor once this step is done; unchanged when nothing is due.
        missed: the first and last missed slot passed over or merged into `fire`, or None.
        wake: when something next comes due (the first slot after `cursor`), or None when
            the schedule has no slot left.
    """

    fire: int | None
    cursor: int
    missed: tuple[int, int] | None
    wake: int | None


def decide(schedule: Schedule, cursor: int, now: float, misfire: Misfire) -> Step:
    """Decide what to do at `now` for a job whose cursor is `cursor`.

    Args:
        schedule: the job's schedule.
        cursor: the last slot the job is done with (epoch seconds).
        now: the broker clock's time (epoch seconds).
        misfire: what to do with missed slots.
    """
    first = schedule.next_after(cursor)
    if first is None or first > now:
        return Step(None, cursor, None, first)
    if first >= now - GRACE:
        return Step(first, first, None, schedule.next_after(first))
    # `first` is missed: find the last missed slot (older than GRACE; `first` is one).
    last_missed = schedule.latest_at_or_before(math.ceil(now - GRACE) - 1)
    assert last_missed is not None
    missed = (first, last_missed)
    following = schedule.next_after(last_missed)
    if following is not None and following <= now:
        # A late slot follows: it runs next, and stands for the missed ones.
        return Step(None, last_missed, missed, following)
    if misfire == "once":
        return Step(last_missed, last_missed, missed, following)
    return Step(None, last_missed, missed, following)
