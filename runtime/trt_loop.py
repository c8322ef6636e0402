"""The TensorRT backends' denoising loop on the device: every sampler, per-row guidance and guidance
interval, no host sync per step, one CUDA graph per UNet batch size.

The math is samplers.py's: each step gathers its scalars from the sampler's tables into fixed
device slots, and ``samplers.sampler_step`` runs on torch tensors exactly as on numpy arrays
(backend_ort.py's loop, which tests compare with this one). What is on the device, uploaded once
per loop:

- the conditioning of every image row, 2n rows (engine.DenoiseBatch: uncond rows, then cond rows);
- per step, the rows of its UNet batch (engine.step_rows: the guided images' uncond rows, every
  image's cond row, padding to a static profile's batch), each image's uncond and cond position
  in it, and the sampler's scalars; a stochastic sampler's noise of every step;
- the latents, the multistep history (the last data predictions) and UniPC's corrected sample,
  per row, allocated once per loop shape.

A step is: copy step i's slots from the tables (device to device), then the body: gather the
UNet inputs from the conditioning by the row slot, the UNet, the per-row CFG combine
``uncond + g * (cond - uncond)`` (an image outside its interval takes its cond output at both
positions: cond + g * 0 = cond), the sampler step, the history update. The UNet batch R of a
step may differ from the previous one under guidance intervals; with ``cuda_graph`` each R gets
its own captured body and execution context (TensorRT keeps a launch's shape state in the
context), all on one loop state. The host learns R from the guidance mask, so it never waits.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .device import from_host, host_copy
from .engine import DenoiseBatch, StepCallback, guidance_column, step_rows
from .samplers import SamplerTables, StepCoefficients, sampler_step
from .spec import check_feeds

logger = logging.getLogger(__name__)

_SCALARS = ("divisor", "p", "q", "a", "dt", "c", "f", "g")


class _Loop:
    """The device state of loops of one shape: n image rows at h x w, one sampler's step structure."""

    def __init__(self, unet, batch: DenoiseBatch, sampler: SamplerTables):
        import torch

        self.unet, self.device = unet, unet.buffers["sample"].device
        self.n, self.h, self.w = batch.latents.shape[0], batch.latents.shape[2], batch.latents.shape[3]
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        latent = batch.latents.shape
        self.x = zeros(*latent)  # [n, C, h, w]
        self.previous = [zeros(*latent) for _ in range(max(sampler.history - 1, 0))]  # newest first
        self.base = zeros(*latent) if sampler.f is not None else None  # UniPC's corrected sample
        self.noise = zeros(*latent) if sampler.stochastic else None
        self.conditioning = {k: zeros(*v.shape) for k, v in batch.conditioning.items()}  # [2n, ...]
        self.guidance = zeros(self.n, 1, 1, 1)
        self.t = zeros()
        tables = _coefficient_tables(sampler)
        self.slots = {k: zeros(*v.shape[1:]) for k, v in tables.items()}
        self.coefficients = StepCoefficients(**{f: self.slots.get(f) for f in StepCoefficients._fields})
        self.positions = {k: zeros(self.n, dtype=torch.int64) for k in ("uncond", "cond")}
        self.rows: dict = {}  # R -> (conditioning rows [R], latent rows [R]) slots
        self.graphs: dict = {}  # R -> (graph or None, context, views)

    @staticmethod
    def key(batch: DenoiseBatch, sampler: SamplerTables) -> tuple:
        return (batch.latents.shape, sampler.history, sampler.f is not None, sampler.dt is not None,
                sampler.stochastic)

    def start(self, batch: DenoiseBatch, sampler: SamplerTables, previous, base) -> None:
        """Upload one loop's inputs into this state (host to device, once per loop)."""
        import torch

        dev = lambda a, dtype=np.float32: from_host(np.asarray(a), self.device, dtype)  # noqa: E731
        self.x.copy_(dev(batch.latents))
        for buffer, value in zip(self.previous, previous):
            buffer.copy_(dev(value))
        if self.base is not None:
            self.base.copy_(dev(base))
        for name, value in batch.conditioning.items():
            self.conditioning[name].copy_(dev(value))
        self.guidance.copy_(dev(guidance_column(batch.guidance)))
        self.tables = {k: dev(v) for k, v in _coefficient_tables(sampler).items()}
        self.timesteps = dev(sampler.timesteps)
        self.noise_table = None if batch.noise is None else dev(batch.noise)  # [steps, n, C, h, w]
        fewest = self.unet.spec.dims["unet_batch"].min
        plan = [_step_plan(batch.cfg[i], fewest) for i in range(sampler.steps)]
        self.sizes = [len(rows) for rows, _, _ in plan]
        self.plan = {"rows": dev(np.stack([_pad(rows, max(self.sizes)) for rows, _, _ in plan]), np.int64),  # [steps, R]
                     "uncond": dev(np.stack([p[1] for p in plan]), np.int64),  # [steps, n]
                     "cond": dev(np.stack([p[2] for p in plan]), np.int64)}
        for size in set(self.sizes):
            if size not in self.rows:
                self.rows[size] = (torch.zeros(size, dtype=torch.int64, device=self.device),
                                   torch.zeros(size, dtype=torch.int64, device=self.device))

    def load(self, i: int) -> int:
        """Step i's slots from the tables (device to device: no host sync); returns its UNet batch size."""
        for k, table in self.tables.items():
            self.slots[k].copy_(table[i])
        self.t.copy_(self.timesteps[i])
        size = self.sizes[i]
        rows, latent_rows = self.rows[size]
        rows.copy_(self.plan["rows"][i, :size])
        latent_rows.copy_(rows % self.n)
        self.positions["uncond"].copy_(self.plan["uncond"][i])
        self.positions["cond"].copy_(self.plan["cond"][i])
        if self.noise is not None:
            self.noise.copy_(self.noise_table[i])
        return size

    def views(self, size: int):
        """(context, views of the UNet buffers) for a UNet batch of ``size`` rows."""
        values = {"unet_batch": size, "latent_height": self.h, "latent_width": self.w}
        shapes = {k: np.empty((size, *v.shape[1:]), np.float32) for k, v in self.conditioning.items()}
        check_feeds(self.unet.spec, {**shapes, "sample": np.empty((size, self.x.shape[1], self.h, self.w), np.float32),
                                     "timestep": np.empty((1,), np.float32)})
        context = self.unet.context if not self.unet.cuda_graph else self.unet.new_context()
        return context, self.unet.set_shapes(values, context)

    def body(self, size: int, context, v: dict) -> None:
        """Gather the step's UNet inputs, the UNet, per-row CFG, the sampler step, the history update."""
        import torch

        rows, latent_rows = self.rows[size]
        for name, value in self.conditioning.items():
            torch.index_select(value, 0, rows, out=v[name])
        torch.index_select(self.x, 0, latent_rows, out=v["sample"])
        v["sample"].div_(self.slots["divisor"])
        v["timestep"].copy_(self.t.reshape(1))
        self.unet.enqueue(context)
        eps = v["noise_pred"]
        uncond, cond = eps.index_select(0, self.positions["uncond"]), eps.index_select(0, self.positions["cond"])
        model_output = uncond + self.guidance * (cond - uncond)
        x, y, base = sampler_step(self.coefficients, self.x, model_output, self.previous, self.base, self.noise)
        for newer, older in zip(self.previous[-2::-1], self.previous[:0:-1]):  # shift the history, oldest first
            older.copy_(newer)
        if self.previous:
            self.previous[0].copy_(y)
        if self.base is not None:
            self.base.copy_(base)
        self.x.copy_(x)

    def step(self, size: int) -> None:
        """Run the body at ``size`` rows: replay its graph (captured on first use), or run it."""
        found = self.graphs.get(size)
        if found is None:
            context, v = self.views(size)
            graph = _capture(self, size, context, v) if self.unet.cuda_graph else None
            found = self.graphs[size] = (graph, context, v)
        graph, context, v = found
        if graph is not None:
            graph.replay()
        else:
            self.unet.set_shapes({"unet_batch": size, "latent_height": self.h, "latent_width": self.w}, context)
            self.body(size, context, v)


def _coefficient_tables(sampler: SamplerTables) -> dict:
    """The per-step scalar and vector tables of a sampler ([steps] or [steps, K]); absent terms left out."""
    tables = {k: getattr(sampler, k) for k in _SCALARS if getattr(sampler, k) is not None}
    tables["sigma"] = sampler.sigmas[: sampler.steps]
    tables["b"] = sampler.b
    if sampler.d is not None:
        tables["d"] = sampler.d
    return tables


def _step_plan(cfg_step: np.ndarray, fewest: int) -> tuple:
    """(conditioning rows of the UNet batch, each image's uncond position, its cond position)."""
    guided, rows = step_rows(cfg_step, fewest)
    cond = len(guided) + np.arange(len(cfg_step))
    uncond = cond.copy()
    uncond[guided] = np.arange(len(guided))
    return rows, uncond, cond


def _pad(values: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([values, np.zeros(size - len(values), values.dtype)])


def _capture(loop: _Loop, size: int, context, views):
    """The body at ``size`` rows as a CUDA graph on its own execution context, whose shapes never change."""
    unet = loop.unet
    check = getattr(context, "is_stream_capturable", None)  # where the installed TensorRT has it
    if check is not None and not check(unet.stream.cuda_stream):
        logger.warning("unet: this execution context cannot be captured on its stream; steps run without a CUDA graph")
        unet.cuda_graph = False
        return None
    unet.enqueue(context)  # TensorRT needs one launch before capture (lazy initialisation); writes only its output
    graph = unet.device.CUDAGraph()
    with unet.device.graph(graph, stream=unet.stream):
        loop.body(size, context, views)  # recorded, not run
    return graph


def denoise_device(unet, batch: DenoiseBatch, sampler: SamplerTables,
                   on_step: Optional[StepCallback] = None) -> np.ndarray:
    """The denoising loop on the device; the contract of engine.Backend.denoise."""
    previous = [np.zeros_like(batch.latents)] * max(sampler.history - 1, 0)
    base, start = batch.latents, 0
    with unet.device.stream(unet.stream):
        while True:
            key = _Loop.key(batch, sampler)
            loop = unet.graphs.get(key) if unet.cuda_graph else None
            if loop is None:
                loop = _Loop(unet, batch, sampler)
                if unet.cuda_graph:
                    unet.graphs[key] = loop
            loop.start(batch, sampler, previous, base)
            keep = None
            for i in range(start, sampler.steps):
                size = loop.load(i)
                loop.step(size)
                unet.runs += 1
                unet.rows += size
                if on_step is not None:  # host-side; it waits for the device only if it reads the latents
                    keep = on_step(i, lambda: host_copy(loop.x))
                    if keep is not None:
                        break
            out = host_copy(loop.x)  # the one sync of an uninterrupted loop
            if keep is None:
                break
            keep, start = list(keep), i + 1
            if not keep or start == sampler.steps:
                out = out[keep]
                break
            previous = [host_copy(p)[keep] for p in loop.previous]
            base = host_copy(loop.base)[keep] if loop.base is not None else None
            batch = batch.keep(keep, out[keep])
    return out  # rows of several requests: the pipeline checks each request's rows


__all__ = ["denoise_device"]
