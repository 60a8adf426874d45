"""The election and the leader loop of one job, on the broker.

Every scheduler consumes the job's queue ``<exchange>.scheduler.<job>``, declared with
``x-single-active-consumer``: RabbitMQ delivers to one consumer only, and when that consumer
goes (cancelled, channel closed, connection lost, process killed) the next one takes over,
with every message the first had not acked. The queue holds one *state message* (the last
slot the job is done with, the schedule's fingerprint, a sequence number), and the active
consumer holds it unacked for as long as it leads. So leadership and state move together:

- to fire slot T, the leader publishes the task message (confirmed, message id
  ``cron:<job>:<T>``), then the next state message (cursor T, confirmed), then acks the state
  it held. The next state comes back to it, the active consumer, and it holds that one.
  Killed between the two publishes, it leaves the old state in the queue: the next leader
  fires T again, under the same message id. Killed between the second publish and the ack, it
  leaves both: the next leader keeps the newest (`cuebx.scheduling.state.wins_over`);
- it re-publishes its state at least every `refresh` seconds even when nothing fires, so it
  never holds a delivery for as long as RabbitMQ's ``consumer_timeout`` (30 minutes by
  default), which would close its channel;
- it never fires from memory alone: before each fire it checks that the channel that
  delivered its state is still open. A leader whose channel closed (a lost connection,
  a consumer timeout) steps down: aio-pika reopens the channel and consumes again, at the end
  of the line, and fires again only from a state the broker hands it;
- a scheduler that starts publishes a *seed* (a state without cursor), so that a new job's
  queue, or one whose state was lost, is never empty. A seed loses against any real state:
  the leader acks it, and waits `SETTLE` seconds before it starts a job from a seed, in case
  a real state is behind it in the queue;
- after each state it publishes a status to ``<exchange>.scheduler-status.<job>`` (a
  last-value queue) for ``cuebx schedule``; a scheduler waiting in line reads it from time to
  time and offers a seed when no leader has reported for a long time (the state message was
  purged, say).

All waiting is on ``broker.clock``, so on ``memory://`` a week of schedule runs in no time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import msgspec

from cuebx.brokers.base import Broker, Delivery
from cuebx.errors import BrokerError
from cuebx.scheduling.job import Job
from cuebx.scheduling.misfire import Step, decide
from cuebx.scheduling.overlap import claim
from cuebx.scheduling.schedules import slot_text
from cuebx.scheduling.state import (
    HEADER_JOB,
    HEADER_SLOT,
    JobState,
    JobStatus,
    decode,
    encode,
    rank,
    read_latest,
    state_queue_name,
    status_queue_name,
)

__all__ = ["HANDBACK", "SETTLE", "JobLeader"]

logger = logging.getLogger("cuebx.scheduler")

#: Unacked state messages one scheduler may hold: its own and a few seeds to discard.
PREFETCH = 20
#: Seconds a leader holding a seed waits for a real state that may be behind it.
SETTLE = 1.0
#: Seconds a leader waits for its own next state to come back before it counts as stepped down.
HANDBACK = 10.0
#: Seconds before trying again when a publish failed.
RETRY = 5.0


@dataclass(slots=True)
class _Held:
    """A state message delivered to this scheduler and not settled yet."""

    delivery: Delivery
    state: JobState
    received: float  # broker clock time


class JobLeader:
    """One job's scheduler in one worker: in line, or the active one firing its slots.

    Args:
        job: the job.
        broker: the connected broker.
        exchange: the app's exchange, which names the job's queues.
        identity: who this scheduler is, in logs, state and status messages.
        refresh: longest time between two state messages of the leader, in seconds.
    """

    def __init__(
        self, job: Job, broker: Broker, *, exchange: str, identity: str, refresh: float
    ) -> None:
        self.job = job
        self.broker = broker
        self.clock = broker.clock
        self.identity = identity
        self.refresh = refresh
        self.queue = state_queue_name(exchange, job.name)
        self.status_queue = status_queue_name(exchange, job.name)
        self.exchange = exchange
        self.leading = False
        self._inbox: list[_Held] = []
        self._arrival: anyio.Event | None = None
        self._held: _Held | None = None
        # We acked our state after publishing the next one, which should come back to us.
        self._handing_back = False
        # Cycle at once on becoming active, so the state and status name the new leader.
        self._stamp = False
        self._seed_since: float | None = None
        # The state that records a confirmed fire, until it is on the broker.
        self._unwritten: JobState | None = None

    async def run(self) -> None:
        """Take part in the job's election until cancelled, firing while active."""
        subscription = await self.broker.consume(self.queue, PREFETCH, self._arrived)
        try:
            await self._publish_state(JobState(job=self.job.name, leader=self.identity))
            while True:
                await self._turn()
        finally:
            with anyio.CancelScope(shield=True):
                # Closing the channel puts the held state back: the next in line leads.
                await subscription.close()
            if self.leading:
                self._step_down("the worker is stopping")

    # -- receiving --------------------------------------------------------------------------

    async def _arrived(self, delivery: Delivery) -> None:
        """Keep a delivered state for the loop; drop what is not a state of this job."""
        try:
            state = decode(JobState, delivery.body)
        except msgspec.MsgspecError:
            state = None
        if state is None or state.job != self.job.name:
            logger.warning(
                "job %s: dropping message %s from %r: not a state of this job",
                self.job.name,
                delivery.message_id,
                self.queue,
            )
            await delivery.ack()
            return
        self._inbox.append(_Held(delivery, state, self.clock.time()))
        if self._arrival is not None:
            self._arrival.set()

    async def _wait(self, until: float) -> bool:
        """Wait until `until` on the broker clock, or less if a state arrives: True if one did."""
        if self._inbox:
            return True
        arrival = self._arrival = anyio.Event()
        async with anyio.create_task_group() as group:

            async def alarm() -> None:
                await self.clock.sleep_until(until)
                group.cancel_scope.cancel()

            group.start_soon(alarm)
            await arrival.wait()
            group.cancel_scope.cancel()
        return bool(self._inbox)

    async def _take(self) -> _Held | None:
        """Keep the newest live state among those held; ack the others."""
        inbox, self._inbox = self._inbox, []
        previous = self._held
        if previous is not None and not previous.delivery.channel_open and self.leading:
            self._step_down(
                "its channel closed (connection lost, or the consumer timeout); its state went "
                "back to the queue"
            )
        candidates = [h for h in (previous, *inbox) if h is not None and h.delivery.channel_open]
        best = max(candidates, key=lambda h: rank(h.state), default=None)
        for other in candidates:
            if other is not best:
                await other.delivery.ack()
        self._held = best
        return best

    # -- the loop ---------------------------------------------------------------------------

    async def _turn(self) -> None:
        held = await self._take()
        if held is None:
            await self._wait_in_line()
            return
        if not self.leading:
            self.leading, self._stamp = True, True
            logger.info(
                "job %s: this worker is now the active scheduler (%s)",
                self.job.name,
                self.identity,
            )
        self._handing_back = False
        await self._lead(held)

    async def _wait_in_line(self) -> None:
        if self.leading:
            # Our next state is on its way back, unless another scheduler took over.
            if not await self._wait(self.clock.time() + HANDBACK):
                self._step_down("its state message went to another scheduler")
            return
        if not await self._wait(self.clock.time() + 5 * self.refresh):
            await self._watch()

    def _step_down(self, why: str) -> None:
        self.leading, self._handing_back = False, False
        # A fire whose state never reached the broker: the next leader repeats that slot,
        # under the same message id.
        self._unwritten = None
        logger.info(
            "job %s: this worker is no longer the active scheduler (%s): %s",
            self.job.name,
            self.identity,
            why,
        )

    async def _lead(self, held: _Held) -> None:
        state, job, now = held.state, self.job, self.clock.time()
        if state.seed:
            await self._start(held, now)
            return
        self._seed_since = None
        if state.fingerprint != job.fingerprint:
            logger.warning(
                "job %s: its schedule changed from %r to %r: it starts again from now, "
                "without catching up",
                job.name,
                state.fingerprint,
                job.fingerprint,
            )
            await self._cycle(held, int(now), None)
            return
        assert state.cursor is not None
        step = decide(job.schedule, state.cursor, now, job.misfire)
        if step.missed is not None:
            self._log_missed(step)
        if step.fire is not None or step.cursor != state.cursor:
            await self._cycle(held, step.cursor, step.fire)
            return
        refresh_at = held.received + self.refresh
        if self._stamp or now >= refresh_at:
            await self._cycle(held, state.cursor, None)
            return
        await self._wait(refresh_at if step.wake is None else min(step.wake, refresh_at))

    async def _start(self, held: _Held, now: float) -> None:
        """Start the job from a seed, once no real state showed up behind it."""
        if self._seed_since is None:
            self._seed_since = now
        if now < self._seed_since + SETTLE:
            await self._wait(self._seed_since + SETTLE)
            return
        self._seed_since = None
        first = self.job.schedule.next_after(int(now))
        logger.info(
            "job %s: no state on the broker yet: starting now; first slot %s",
            self.job.name,
            "none" if first is None else slot_text(first),
        )
        await self._cycle(held, int(now), None)

    def _log_missed(self, step: Step) -> None:
        assert step.missed is not None
        first, last = step.missed
        span = slot_text(first) if first == last else f"{slot_text(first)} to {slot_text(last)}"
        outcome = (
            f"one catch-up run for {slot_text(last)}"
            if step.fire is not None
            else "the next slot stands for them"
            if step.wake is not None and step.wake <= self.clock.time()
            else "skipped (misfire='skip')"
        )
        logger.warning(
            "job %s: missed slots %s (no active scheduler then): %s", self.job.name, span, outcome
        )

    # -- firing -----------------------------------------------------------------------------

    async def _cycle(self, held: _Held, cursor: int, fire: int | None) -> None:
        """Fire `fire` (if any), publish the next state, and ack the one held.

        Shielded: a stop between the steps would repeat the slot at the next leader. Once a
        fire is confirmed, the state that records it is kept here until it is published: a
        state publish that fails is retried on its own, never with the fire again.
        """
        if not held.delivery.channel_open:
            return  # the next turn steps down
        state = held.state
        with anyio.CancelScope(shield=True):
            try:
                following = self._unwritten
                if following is None:
                    fired = fire if fire is not None and await self._fire(fire) else state.fired
                    following = self._unwritten = JobState(
                        job=self.job.name,
                        fingerprint=self.job.fingerprint,
                        cursor=cursor,
                        fired=fired,
                        seq=state.seq + 1,
                        leader=self.identity,
                        written=self.clock.time(),
                    )
                await self._publish_state(following)
            except Exception:
                logger.exception(
                    "job %s: %s; trying again in %gs",
                    self.job.name,
                    "publishing its state failed (the slot fired already)"
                    if self._unwritten is not None
                    else "firing failed: the slot stays due",
                    RETRY,
                )
                failed = True
            else:
                self._unwritten = None
                await held.delivery.ack()
                self._held, self._handing_back, self._stamp = None, True, False
                failed = False
        if failed or following is None:
            await self.clock.sleep(RETRY)
            return
        await self._publish_status(following)

    async def _fire(self, slot: int) -> bool:
        """Publish the task message of `slot`; False when ``overlap="skip"`` held it back."""
        job = self.job
        if job.overlap == "skip":
            busy = await claim(self.broker, self.exchange, job, slot, self.clock.time())
            if busy is not None:
                logger.info(
                    "job %s: slot %s skipped: the run of slot %s is still going (overlap='skip')",
                    job.name,
                    slot_text(slot),
                    slot_text(busy),
                )
                return False
        message_id = job.message_id(slot)
        await job.task.apply_async(
            job.args,
            job.kwargs,
            message_id=message_id,
            headers={HEADER_JOB: job.name, HEADER_SLOT: slot_text(slot)},
        )
        logger.info("job %s: fired slot %s as message %s", job.name, slot_text(slot), message_id)
        return True

    async def _publish_state(self, state: JobState) -> None:
        await self.broker.publish("", self.queue, encode(state, "state"))

    async def _publish_status(self, state: JobState) -> None:
        status = JobStatus(
            job=self.job.name,
            schedule=self.job.schedule.describe(),
            leader=self.identity,
            fired=state.fired,
            next=None if state.cursor is None else self.job.schedule.next_after(state.cursor),
            written=self.clock.time(),
            refresh=self.refresh,
        )
        try:
            await self.broker.publish("", self.status_queue, encode(status, "status"))
        except BrokerError as exc:
            logger.warning("job %s: could not publish its status: %s", self.job.name, exc)

    # -- waiting in line --------------------------------------------------------------------

    async def _watch(self) -> None:
        """Offer a seed when no leader reported for long: the state message may be gone."""
        status = await read_status(self.broker, self.status_queue)
        now = self.clock.time()
        if status is not None and now - status.written < 3 * status.refresh:
            return
        logger.warning(
            "job %s: no active scheduler has reported for a while; offering a fresh state in "
            "case the state message was lost",
            self.job.name,
        )
        await self._publish_state(JobState(job=self.job.name, leader=self.identity))


async def read_status(broker: Broker, queue: str) -> JobStatus | None:
    """Read a job's last status without taking it; None when there is none."""
    return await read_latest(broker, queue, JobStatus)
