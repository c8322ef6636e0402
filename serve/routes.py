"""The Images API routes: generations (JSON), edits (multipart, the IP-Adapter
reference as ``image``), references (upload once, pass ``reference_id`` later).

A handler validates, decodes the upload and runs the request's checks in the thread
pool (``Pipeline.check``: no engine), submits the request to the worker and awaits
its answer. While it waits it polls for the client's disconnect and stops the job
(the worker drops it from the queue or stops it between denoising steps), so no GPU
work continues for nobody. Under Ray Serve a disconnect cancels the handler instead;
both paths stop the job.

Streams send previews (``partial_images``) made from the latents the worker thread
hands over after a step; the projection and the PNG/JPEG encoding run in the thread
pool, never on the worker thread that owns the engines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from kolors_trt.runtime.lora import LoraError
from kolors_trt.runtime.preprocess import ImageInputError

from .errors import DeadlineError, NotFoundError, ServeInputError, UnavailableError, http_error
from .images import b64, encode, preview
from .middleware import CLIENT_GONE, request_note
from .protocol import EditParams, GenerationParams, ImageParams, check_limits, check_unknown, generation_request
from .protocol import parse_form, preview_steps
from .scheduler import DEADLINE, DISCONNECTED
from .worker import ENCODE, ENCODE_KEY, GENERATE, Work

logger = logging.getLogger(__name__)

router = APIRouter()
POLL_S = 0.1  # how often a waiting handler looks for the client's disconnect
GRACE_S = 5.0  # past the deadline, a handler stops waiting for a worker that did not answer (a hung step)
KEEPALIVE_S = 10.0  # a stream sends a comment line when nothing else was sent for this long
IMAGE_FILES = ("image", "image[]")
EDIT_FIELDS = frozenset(EditParams.model_fields)
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}  # OpenAI's stream events carry usage; this server does no token accounting


class ClientGone(Exception):
    """The client disconnected while its request ran."""


def loaded_pipe(worker):
    if worker.state not in ("ready", "failing") or not worker.alive:
        raise UnavailableError(f"the model cannot take requests ({worker.state_now}); retry when /health/ready "
                               "is 200")
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


async def read_form(request: Request, known=frozenset()) -> tuple[dict, Optional[bytes]]:
    """Multipart text fields (one value each) and the one reference image (``image`` or ``image[]``). Other file
    fields follow the unknown-field rule (protocol.py): ignored with a warning, but ``mask``, which OpenAI's
    edits take and IP-Adapter-Plus has no use for, is refused."""
    form = await request.form(max_files=4, max_fields=64)
    try:
        fields, images = {}, []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name in IMAGE_FILES:
                    images.append(value)
                elif name == "mask":
                    raise ServeInputError("mask: not taken; IP-Adapter-Plus uses the whole reference image (no "
                                          "masks)", "mask")
                else:
                    logger.warning("%s: ignoring the unknown file field %r", request.url.path, name)
            elif name in IMAGE_FILES:  # a text field: never read as a path or URL
                raise ServeInputError(f"{name}: must be a file upload (multipart), found a text field", "image")
            elif name in fields and name in known:
                raise ServeInputError(f"{name}: given more than once", name)
            else:
                fields.setdefault(name, value)  # an unknown field given twice is ignored like once
        if len(images) > 1:
            raise ServeInputError(f"image: {len(images)} images sent; IP-Adapter-Plus takes one reference image",
                                  "image")
        image = await images[0].read() if images else None
    finally:
        await form.close()
    if image is not None and not image:
        raise ImageInputError("image: the upload is empty, no image")
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

    def previews(self, latents: np.ndarray, step: int, steps: int, partial_index: int) -> list:
        """The partial_image events of one step's latents [n, C, h, w] (a thread-pool thread: the projection and
        the encoding never run on the worker thread)."""
        return [self.event("partial_image", b64(encode(img, self.params.output_format,
                                                       self.params.output_compression)),
                           partial_image_index=partial_index, index=i, step=step + 1, steps=steps)
                for i, img in enumerate(preview(latents))]


def prepare(pipe, request):
    """Pipeline.check (every check, the image decoded, the LoRAs loaded from --lora-dir on first use; no engine),
    the reference's content id and the request's batch key (the runtime's key and the UNet's LoRA set)."""
    try:
        checked = pipe.check(request)
    except LoraError as err:
        raise ServeInputError(str(err), "lora") from None
    reference_id = pipe.image_key(checked.pixels) if checked.pixels is not None else None
    return checked, reference_id, (*checked.key, pipe.lora.key(checked.loras, "unet"))


async def answer_images(request: Request, params: ImageParams, image: Optional[bytes], kind: str):
    worker, config = request.app.state.worker, request.app.state.config
    pipe = loaded_pipe(worker)
    check_limits(params, config, pipe, worker.ceilings)
    tokens = None
    if getattr(params, "reference_id", None) is not None:
        if image is not None:
            raise ServeInputError("reference_id: send an image or a reference_id, not both", "reference_id")
        tokens = await run_in_threadpool(pipe.ip_cache.get, params.reference_id)
        if tokens is None:
            raise NotFoundError(f"reference_id {params.reference_id}: unknown here (never uploaded, evicted from "
                                "the cache, or uploaded to a replica that shares no --cache-dir with this one); "
                                "upload the image again with POST /v1/references", "reference_id")
    generation = generation_request(params, pipe, image, tokens, config)
    checked, reference_id, key = await run_in_threadpool(prepare, pipe, generation)  # the worker runs it unchecked
    parameters = {"prompt": params.prompt, "negative_prompt": params.negative_prompt or "", "seed": checked.seed,
                  "height": checked.height, "width": checked.width, "num_inference_steps": checked.steps,
                  "guidance_scale": checked.guidance, "ip_adapter_scale": checked.ip_scale, "n": checked.n,
                  "scheduler": checked.sampler,
                  "guidance_interval": None if checked.interval is None else list(checked.interval),
                  "deep_cache_interval": checked.deep_cache_interval,
                  "reference_id": reference_id or getattr(params, "reference_id", None), "model": config.model_id,
                  "backend": pipe.backend, "lora": pipe.lora.names(checked.loras)}
    reply = Reply(kind, params, parameters, f"{checked.width}x{checked.height}", int(time.time()))
    work = Work(GENERATE, checked, request_id=request_note(request.scope)["request_id"])
    if params.stream:
        return stream(request, reply, work, checked, key)
    try:
        result = await submit_and_wait(request, work, key, checked.n)
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(await run_in_threadpool(reply.body, result))


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream(request: Request, reply: Reply, work: Work, checked, key) -> StreamingResponse:
    """Server-sent events: previews after the steps ``partial_images`` picks (none by default), then one completed
    event per image, then [DONE]. An error after the first event comes as OpenAI's error event."""
    worker = request.app.state.worker
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    at = preview_steps(reply.params.partial_images, checked.steps)

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads the stream
            pass

    def progress(step: int, steps: int, latents_fn) -> None:  # the worker thread, after each step: a copy, no more
        if step in at:
            put(("preview", (np.array(latents_fn(), dtype=np.float32), step, steps)))

    work = dataclasses.replace(work, done=lambda result, error: put(("done", (result, error))), progress=progress)
    job = worker.submit(work, key, checked.n)  # before the first byte: 429 / 503 stay HTTP statuses

    async def events():
        finished, previews = False, 0
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
                if kind == "preview":
                    for event in await run_in_threadpool(reply.previews, *value, previews):
                        yield sse(event)
                    previews += 1
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
                request_note(request.scope)["client_gone"] = True  # the request metrics count it as 499

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/images/generations")
async def generations(params: GenerationParams, request: Request):
    """Text to image (JSON). With reference_id: Kolors + IP-Adapter-Plus on an uploaded reference."""
    check_unknown(params, request.url.path)
    return await answer_images(request, params, None, "image_generation")


@router.post("/v1/images/edits")
async def edits(request: Request):
    """Kolors + IP-Adapter-Plus (multipart): ``image`` is the reference image."""
    fields, image = await read_form(request, EDIT_FIELDS)
    if "reference_id" in fields:
        raise ServeInputError("reference_id: not taken here (the upload `image` is the reference); pass reference_id "
                              "to /v1/images/generations", "reference_id")
    params = parse_form(fields, EditParams)
    check_unknown(params, request.url.path)
    if image is None:
        raise ServeInputError("image: required (the IP-Adapter reference image, a multipart file); or pass "
                              "reference_id to /v1/images/generations", "image")
    return await answer_images(request, params, image, "image_edit")


@router.get("/v1/loras")
async def loras(request: Request):
    """The LoRAs requests may name in ``lora``: the --lora-dir files by stem, loaded ones with their sha256,
    components and rank (404 without --lora-dir)."""
    worker, config = request.app.state.worker, request.app.state.config
    if config.lora_dir is None:
        raise NotFoundError("this server has no LoRA folder (start it with --lora-dir DIR)")
    pipe = loaded_pipe(worker)
    return {"object": "list", "data": await run_in_threadpool(pipe.lora.list)}


@router.post("/v1/references")
async def references(request: Request):
    """Upload a reference image once: its IP tokens are computed and cached; later requests pass the returned
    id as reference_id."""
    worker = request.app.state.worker
    pipe = loaded_pipe(worker)
    fields, image = await read_form(request)
    if fields:
        name = sorted(fields)[0]
        raise ServeInputError(f"{name}: unknown field; /v1/references takes the file `image` only", name)
    if image is None:
        raise ServeInputError("image: required (the reference image, multipart)", "image")
    pixels = await run_in_threadpool(pipe.pixel_values, image)
    key = await run_in_threadpool(pipe.image_key, pixels)
    cached = pipe.ip_cache.contains(key)
    if not cached:
        try:
            await submit_and_wait(request, Work(ENCODE, pixels, request_id=request_note(request.scope)["request_id"]),
                                  ENCODE_KEY, 1)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
    return {"id": key, "object": "reference", "created": int(time.time()), "cached": cached}


__all__ = ["loaded_pipe", "router"]
