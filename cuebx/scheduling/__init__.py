"""Periodic tasks: schedules, the election of the active scheduler, and its leader loop.

The room, by noun: `schedules` (cron and every, as slots: pure), `misfire` (what is due and
what fires: pure), `job` (a task with arguments and a schedule), `state` (the queues and
messages kept on the broker), `leader` (one job's election and firing loop), `overlap`
(``overlap="skip"``) and `scheduler` (the middleware that runs the leaders in each worker).
"""

from cuebx.scheduling.job import Job, Overlap
from cuebx.scheduling.misfire import Misfire
from cuebx.scheduling.scheduler import JobReport, Scheduler
from cuebx.scheduling.schedules import Cron, Every, Schedule

__all__ = ["Cron", "Every", "Job", "JobReport", "Misfire", "Overlap", "Schedule", "Scheduler"]
