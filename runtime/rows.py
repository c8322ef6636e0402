"""The rows of batched generation: which requests share a denoising loop (``chunks``: the same key
and UNet LoRA set), and in one loop which request owns each image row, which rows are still in it,
and the loop's ``on_step`` callback that reports progress and drops cancelled requests' rows
(``LiveRows``); at the end, each request's Generation (``generations``).

Rows are in request order, ``num_images_per_prompt`` rows per request. A cancelled
request's rows leave the batch between steps (the backend pads a step's UNet batch
up to a static profile's size, so the batch may always shrink); when every request
is cancelled the loop stops.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Optional, Sequence

from .request import CheckedRequest, Generation, RequestStepCallback


def chunks(jobs: Sequence[CheckedRequest], most: Callable[[CheckedRequest], int],
           weights: Callable[[CheckedRequest], Hashable] = lambda job: None,
           applied: Optional[Hashable] = None) -> list[list[CheckedRequest]]:
    """Jobs grouped by key and by ``weights(job)`` (the UNet's LoRA set it runs with), each group cut into loops
    of at most ``most(job)`` images (the profile's batch for the group's guidance). Groups run in first-come
    order, except that those whose weights are ``applied`` already (the UNet's current set) go first: a burst of
    mixed sets swaps once per set, not per request."""
    groups: OrderedDict = OrderedDict()
    for job in jobs:
        groups.setdefault((job.key, weights(job)), []).append(job)
    out = []
    for _, group in sorted(groups.items(), key=lambda item: item[0][1] != applied):  # a stable sort
        chunk, images, room = [], 0, most(group[0])
        for job in group:
            if chunk and images + job.n > room:
                out.append(chunk)
                chunk, images = [], 0
            chunk.append(job)
            images += job.n
        out.append(chunk)
    return out


def generations(chunk: Sequence[CheckedRequest], images: dict, failed: dict, backend: str, model) -> list[Generation]:
    """One Generation per request of a finished loop: its error (``failed``: index -> error), its (latents, VAE
    output) from ``images``, or cancelled (in neither)."""
    results = []
    for job in chunk:
        parameters = job.parameters(backend, model)
        if job.index in failed:
            results.append(Generation(None, None, parameters, error=failed[job.index]))
        elif job.index not in images:
            results.append(Generation(None, None, parameters, cancelled=True))
        else:
            results.append(Generation.of(job.output_type, *images[job.index], parameters))
    return results


class LiveRows:
    """Row bookkeeping of one chunk of requests (see the module docstring)."""

    def __init__(self, chunk: Sequence[CheckedRequest], on_step: Optional[RequestStepCallback] = None,
                 cancelled: Optional[Callable[[int], bool]] = None, progress: Optional[Callable[[], None]] = None):
        self.chunk = list(chunk)
        self.owners = [job.index for job in self.chunk for _ in range(job.n)]  # request index of each row
        self.alive = list(range(len(self.owners)))  # rows of `owners` still in the loop, in loop order
        self.dead: set = set()
        self._on_step, self._cancelled, self._progress = on_step, cancelled, progress

    def live(self) -> list[CheckedRequest]:
        return [job for job in self.chunk if job.index not in self.dead]

    def where(self, index: int) -> list[int]:
        """Positions of request ``index``'s rows among the rows still in the loop."""
        return [k for k, row in enumerate(self.alive) if self.owners[row] == index]

    def __call__(self, step: int, latents_now: Callable) -> Optional[list[int]]:
        """The backend's on_step: None (every row goes on), the positions to keep, or [] (stop)."""
        if self._progress is not None:
            self._progress()
        live = self.live()
        if self._on_step is not None:
            memo: dict = {}

            def current():
                if "x" not in memo:
                    memo["x"] = latents_now()
                return memo["x"]

            for job in live:
                self._on_step(job.index, step, job.steps, lambda where=self.where(job.index): current()[where])
        if self._cancelled is None:
            return None
        stopped = [job.index for job in live if self._cancelled(job.index)]
        if not stopped:
            return None
        self.dead.update(stopped)
        if len(self.dead) == len(self.chunk):
            return []
        keep = [k for k, row in enumerate(self.alive) if self.owners[row] not in self.dead]
        self.alive[:] = [self.alive[k] for k in keep]
        return keep


__all__ = ["LiveRows", "chunks", "generations"]
