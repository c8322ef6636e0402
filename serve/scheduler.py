"""The batcher: a pure object, queue in, batch out (no threads, no clock of its own).

Requests wait in one FIFO. ``poll(now)`` answers with what to do:

- drop the jobs that were stopped (a disconnected client, a shutdown) or are past
  their deadline: they never reach a batch;
- run a batch: the oldest job and the later jobs with its key (for generations:
  height, width, steps, guidance at some step or none, sampler, the UNet's LoRA set), up
  to ``most(key)`` images, in arrival order. The batch runs as soon as it is full, or
  when its oldest job has waited ``max_wait_s`` for company;
- or wait: how long until the oldest job's wait ends or the next deadline passes.

The oldest job always decides the next batch, so no group starves: a job waits at
most ``max_wait_s`` plus the batches queued before it. One exception, bounded: with
``prefer`` (keys that need no LoRA swap), when the oldest job's key would swap weights
and a job of a preferred key arrived within ``max_wait_s`` of it, that job's batch runs
first (when the oldest one's would have), so a burst of mixed styles does not swap
per request; the oldest job then leads the next batch. The worker (worker.py) owns a
Scheduler under its lock and feeds it the clock; tests drive it with made-up times.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

logger = logging.getLogger(__name__)

DEADLINE = "deadline"
DISCONNECTED = "disconnected"
SHUTDOWN = "shutdown"


@dataclass(eq=False)
class Job:
    """One queued piece of work. ``stop`` may be called from any thread; the worker drops a stopped job
    from the queue, or stops it between denoising steps."""

    key: Hashable  # jobs with equal keys may share a batch
    images: int  # what the job adds to a batch's size
    arrival: float  # monotonic seconds
    deadline: float  # monotonic seconds
    payload: object = None  # what the worker runs
    stop_reason: Optional[str] = None  # DEADLINE | DISCONNECTED | SHUTDOWN; the first reason given wins
    started: Optional[float] = None  # when its batch started
    extra: dict = field(default_factory=dict)  # the worker's and the front end's notes (future, stream sink)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self, now: float) -> bool:
        """Stopped by someone, or past the deadline (which then becomes the reason)."""
        if self.stop_reason is None and now >= self.deadline:
            self.stop(DEADLINE)
        return self.stop_reason is not None


@dataclass
class Decision:
    batch: list  # jobs to run now, in arrival order ([] when none)
    dropped: list  # jobs removed without running (each has its stop_reason)
    wait_s: Optional[float]  # when no batch: seconds until the next poll may give one; None: the queue is empty


class Scheduler:
    def __init__(self, max_queue: int, max_wait_s: float, most: Callable[[Hashable], int],
                 prefer: Optional[Callable[[Hashable], bool]] = None):
        self.max_queue = int(max_queue)
        self.max_wait_s = float(max_wait_s)
        self.most = most  # key -> the most images one batch of that key takes
        self.prefer = prefer  # key -> True when its batch needs no weight swap (module docstring)
        self._queue: deque = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full (the caller answers 429)."""
        if len(self._queue) >= self.max_queue:
            return False
        self._queue.append(job)
        return True

    def take_all(self) -> list:
        """Empty the queue (shutdown): the jobs, in arrival order."""
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    def poll(self, now: float, hurry: bool = False) -> Decision:
        """What to do at ``now``. ``hurry`` (draining): run what is queued without waiting for company."""
        dropped = [job for job in self._queue if job.should_stop(now)]
        if dropped:
            self._queue = deque(job for job in self._queue if job.stop_reason is None)
        if not self._queue:
            return Decision([], dropped, None)
        head = lead = self._queue[0]
        if self.prefer is not None and not self.prefer(head.key):
            lead = next((job for job in self._queue if job.arrival - head.arrival <= self.max_wait_s
                         and self.prefer(job.key)), head)
        room = self.most(lead.key)
        batch, images = [], 0
        for job in self._queue:
            if job.key != lead.key:
                continue
            if batch and images + job.images > room:
                continue  # a later, smaller job may still fit; this one leads a later batch
            batch.append(job)
            images += job.images
            if images >= room:
                break
        waited = now - head.arrival
        if images >= room or waited >= self.max_wait_s or hurry:
            taken = set(map(id, batch))
            self._queue = deque(job for job in self._queue if id(job) not in taken)
            return Decision(batch, dropped, None)
        next_deadline = min(job.deadline for job in self._queue)
        wait = max(0.0, min(self.max_wait_s - waited, next_deadline - now))
        return Decision([], dropped, wait)


__all__ = ["DEADLINE", "DISCONNECTED", "Decision", "Job", "SHUTDOWN", "Scheduler"]
