"""The Images API routes: generations (JSON), edits (multipart, the IP-Adapter
reference as ``image``), references (upload once, pass ``reference_id`` later).

A handler validates, decodes the upload and runs the request's checks in the thread
pool (``Pipeline.check``: no engine), submits the request to the worker and awaits
its answer. While it waits it polls for the client's disconnect and stops the job
(the worker drops it from the queue or stops it between denoising steps), so no GPU
work continues for nobody. Under Ray Serve a disconnect cancels the handler instead;
both paths stop the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .errors import DeadlineError, NotFoundError, ServeInputError, UnavailableError, http_error
from .images import b64, encode, preview
from .protocol import ImageParams, check_limits, generation_request, parse_form, preview_steps
from .scheduler import DEADLINE, DISCONNECTED
from .worker import ENCODE, ENCODE_KEY, GENERATE, Work

logger = logging.getLogger(__name__)

router = APIRouter()
POLL_S = 0.1  # how often a waiting handler looks for the client's disconnect
GRACE_S = 5.0  # past the deadline, a handler stops waiting for a worker that did not answer (a hung step)
KEEPALIVE_S = 10.0  # a stream sends a comment line when nothing else was sent for this long
CLIENT_GONE = 499  # nginx's "client closed request": only the metrics ever see it
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}  # OpenAI's stream events carry usage; this server does no token accounting


class ClientGone(Exception):
    """The client disconnected while its request ran."""


def loaded_pipe(worker):
    if worker.state not in ("ready", "failing"):
        raise UnavailableError(f"the model is not loaded yet ({worker.state}); retry when /health/ready is 200")
    return worker.pipe


def settler(loop: asyncio.AbstractEventLoop, future: asyncio.Future):
    """A worker callback that resolves ``future`` on its event loop (the loop of the request: under Ray Serve
    each request may run on another)."""

    def settle(result, error):
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def done(result, error):
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for this answer
            pass

    return done


def past_grace(worker, job) -> bool:
    if worker.clock() > job.deadline + GRACE_S:
        job.stop(DEADLINE)
        return True
    return False


async def await_answer(request: Request, worker, job, future: asyncio.Future):
    """The worker's answer; stops the job when the client goes away or the worker overruns the deadline."""
    try:
        while not future.done():
            await asyncio.wait({future}, timeout=POLL_S)
            if future.done():
                break
            if await request.is_disconnected():
                job.stop(DISCONNECTED)
                future.cancel()
                raise ClientGone()
            if past_grace(worker, job):
                future.cancel()
                raise DeadlineError(f"no answer {GRACE_S:g} s after the deadline (--timeout-s); the request stopped")
        return future.result()
    except asyncio.CancelledError:  # Ray Serve cancels the handler when its client disconnects
        job.stop(DISCONNECTED)
        future.cancel()
        raise


async def submit_and_wait(request: Request, work: Work, key, images: int):
    worker = request.app.state.worker
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    work = dataclasses.replace(work, done=settler(loop, future))
    job = worker.submit(work, key, images)
    return await await_answer(request, worker, job, future)


async def read_form(request: Request, allowed: frozenset) -> tuple[dict, Optional[bytes]]:
    """Multipart fields (one value each) and the one reference image (``image`` or ``image[]``)."""
    form = await request.form(max_files=4, max_fields=64)
    try:
        fields, files = {}, []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((name, value))
            elif name in ("image", "image[]"):  # a text field: never read as a path or URL
                raise ServeInputError(f"{name}: must be a file upload (multipart), found a text field", "image")
            elif name in fields:
                raise ServeInputError(f"{name}: given more than once", name)
            else:
                fields[name] = value
        for name, _ in files:
            if name not in ("image", "image[]"):
                raise ServeInputError(f"{name}: not taken; this server takes one reference image as `image` "
                                      "(IP-Adapter-Plus; no masks)", name)
        if len(files) > 1:
            raise ServeInputError(f"image: {len(files)} images sent; IP-Adapter-Plus takes one reference image",
                                  "image")
        image = await files[0][1].read() if files else None
    finally:
        await form.close()
    if image is not None and not image:
        raise ServeInputError("image: the upload is empty", "image")
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ServeInputError(f"{unknown[0]}: unknown field", unknown[0])
    return fields, image


@dataclass
class Reply:
    """What every answer to one request shares."""

    kind: str  # "image_generation" | "image_edit": the prefix of stream event types
    params: ImageParams
    parameters: dict  # the generation's parameters as the client sees them (seed included)
    size: str  # WIDTHxHEIGHT
    created: int

    def image(self, image, index: int) -> str:
        parameters = dict(self.parameters, index=index)
        return b64(encode(image, self.params.output_format, self.params.output_compression, parameters))

    def event(self, kind: str, data: str, **extra) -> dict:
        return {"type": f"{self.kind}.{kind}", "b64_json": data, "created_at": int(time.time()), "size": self.size,
                "quality": "auto", "background": "opaque", "output_format": self.params.output_format, **extra}

    def body(self, generation) -> dict:
        return {"created": self.created, "data": [{"b64_json": self.image(img, i)}
                                                  for i, img in enumerate(generation.images)],
                "output_format": self.params.output_format, "size": self.size, "parameters": self.parameters}

    def completed(self, generation) -> list:
        return [self.event("completed", self.image(img, i), index=i, usage=USAGE, parameters=self.parameters)
                for i, img in enumerate(generation.images)]


def prepare(pipe, request):
    """Pipeline.check (every check, the image decoded; no engine) and the reference's content id."""
    checked = pipe.check(request)
    reference_id = pipe.image_key(checked.pixels) if checked.pixels is not None else None
    return checked, reference_id


async def answer_images(request: Request, params: ImageParams, image: Optional[bytes], kind: str):
    worker, config = request.app.state.worker, request.app.state.config
    pipe = loaded_pipe(worker)
    check_limits(params, config, pipe)
    tokens = None
    if params.reference_id is not None:
        if image is not None:
            raise ServeInputError("reference_id: send an image or a reference_id, not both", "reference_id")
        tokens = await run_in_threadpool(pipe.ip_cache.get, params.reference_id)
        if tokens is None:
            raise NotFoundError(f"reference_id {params.reference_id}: unknown here (never uploaded, evicted from "
                                "the cache, or uploaded to a replica that shares no --cache-dir with this one); "
                                "upload the image again with POST /v1/references", "reference_id")
    generation = generation_request(params, pipe, image, tokens)
    checked, reference_id = await run_in_threadpool(prepare, pipe, generation)  # the worker runs it unchecked
    parameters = {"prompt": params.prompt, "negative_prompt": params.negative_prompt or "", "seed": checked.seed,
                  "height": checked.height, "width": checked.width, "num_inference_steps": checked.steps,
                  "guidance_scale": checked.guidance, "ip_adapter_scale": checked.ip_scale, "n": checked.n,
                  "reference_id": reference_id or params.reference_id, "model": config.model_id,
                  "backend": pipe.backend}
    reply = Reply(kind, params, parameters, f"{checked.width}x{checked.height}", int(time.time()))
    work = Work(GENERATE, checked)
    if params.stream:
        return stream(request, reply, work, checked)
    try:
        result = await submit_and_wait(request, work, checked.key, checked.n)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(await run_in_threadpool(reply.body, result))


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream(request: Request, reply: Reply, work: Work, checked) -> StreamingResponse:
    """Server-sent events: previews after the steps ``partial_images`` picks (every step by default), then one
    completed event per image, then [DONE]. An error after the first event comes as OpenAI's error event."""
    worker = request.app.state.worker
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    at = preview_steps(reply.params.partial_images, checked.steps)
    made = {"previews": 0}

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads the stream
            pass

    def progress(step: int, steps: int, latents_fn) -> None:  # the worker thread, after each step
        if step not in at:
            return
        for i, img in enumerate(preview(latents_fn())):
            data = b64(encode(img, reply.params.output_format, reply.params.output_compression))
            put(("event", reply.event("partial_image", data, partial_image_index=made["previews"], index=i,
                                      step=step + 1, steps=steps)))
        made["previews"] += 1

    work = dataclasses.replace(work, done=lambda result, error: put(("done", (result, error))), progress=progress)
    job = worker.submit(work, checked.key, checked.n)  # before the first byte: 429 / 503 stay HTTP statuses

    async def events():
        finished = False
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    if past_grace(worker, job):
                        finished = True
                        yield sse(http_error(DeadlineError("no answer after the deadline (--timeout-s)"))[1])
                        return
                    yield ": keep-alive\n\n"
                    continue
                if kind == "event":
                    yield sse(value)
                    continue
                finished = True
                result, error = value
                if error is not None:
                    yield sse(http_error(error)[1])
                    return
                for event in await run_in_threadpool(reply.completed, result):
                    yield sse(event)
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:  # the client went away (the response was cancelled)
                job.stop(DISCONNECTED)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


FORM_FIELDS = frozenset(ImageParams.model_fields)


@router.post("/v1/images/generations")
async def generations(params: ImageParams, request: Request):
    """Text to image (JSON). With reference_id: Kolors + IP-Adapter-Plus on an uploaded reference."""
    return await answer_images(request, params, None, "image_generation")


@router.post("/v1/images/edits")
async def edits(request: Request):
    """Kolors + IP-Adapter-Plus (multipart): ``image`` is the reference image."""
    fields, image = await read_form(request, FORM_FIELDS)
    params = parse_form(fields)
    if image is None and params.reference_id is None:
        raise ServeInputError("image: required (the IP-Adapter reference image), or pass reference_id", "image")
    return await answer_images(request, params, image, "image_edit")


@router.post("/v1/references")
async def references(request: Request):
    """Upload a reference image once: its IP tokens are computed and cached; later requests pass the returned
    id as reference_id."""
    worker = request.app.state.worker
    pipe = loaded_pipe(worker)
    _, image = await read_form(request, frozenset())
    if image is None:
        raise ServeInputError("image: required (the reference image, multipart)", "image")
    pixels = await run_in_threadpool(pipe.pixel_values, image)
    key = await run_in_threadpool(pipe.image_key, pixels)
    cached = pipe.ip_cache.contains(key)
    if not cached:
        try:
            await submit_and_wait(request, Work(ENCODE, pixels), ENCODE_KEY, 1)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return {"id": key, "object": "reference", "created": int(time.time()), "cached": cached}


__all__ = ["router"]
