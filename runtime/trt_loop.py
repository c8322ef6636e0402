"""The TensorRT backends' denoising loop on the device: every sampler, per-row guidance and guidance
interval, DeepCache's two UNet graphs, no host sync per step, one CUDA graph per UNet batch size.

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

DeepCache (deep_cache.py, ``DenoiseBatch.full``): the step's rows split between the full
``unet`` and ``unet_shallow``, each call gathered and padded to its profile on its own. The deep
feature of every conditioning row lives in one device buffer [2n, F, h', w']: a full call
scatters its ``deep_feature`` output rows into it, a shallow call gathers its rows' features
from it, both device to device, so the cache costs no host copy and is part of the captured
body. A step's graph is keyed by (full rows, shallow rows, full rows before padding): the host
knows them from the masks.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .deep_cache import pad_rows, split_step
from .device import from_host, host_copy
from .engine import DenoiseBatch, StepCallback, conditioning_rows, guidance_column, step_rows
from .folder import BackendError
from .samplers import SamplerTables, StepCoefficients, sampler_step
from .spec import check_feeds, shape_of

logger = logging.getLogger(__name__)

_SCALARS = ("divisor", "p", "q", "a", "dt", "c", "f", "g")


class _Loop:
    """The device state of loops of one shape: n image rows at h x w, one sampler's step structure."""

    def __init__(self, unet, batch: DenoiseBatch, sampler: SamplerTables, shallow=None):
        import torch

        self.unet, self.device = unet, unet.buffers["sample"].device
        self.shallow = shallow if batch.full is not None else None
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
        self.features = None  # DeepCache: [2n, F, h', w'], each conditioning row's deep feature
        if self.shallow is not None:
            feature = next(t for t in self.shallow.spec.inputs if t.name == "deep_feature")
            self.features = zeros(*shape_of(feature, self._values(2 * self.n)))
        self.rows: dict = {}  # step key -> [(engine, conditioning rows slot, latent rows slot, real rows)]
        self.graphs: dict = {}  # step key -> (graph or None, [(call, context, views)])

    @staticmethod
    def key(batch: DenoiseBatch, sampler: SamplerTables) -> tuple:
        return (batch.latents.shape, sampler.history, sampler.f is not None, sampler.dt is not None,
                sampler.stochastic, batch.full is not None)

    def _values(self, size: int) -> dict:
        return {"unet_batch": size, "latent_height": self.h, "latent_width": self.w}

    def start(self, batch: DenoiseBatch, sampler: SamplerTables, previous, base, features=None) -> None:
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
        if self.features is not None:
            self.features.copy_(dev(features) if features is not None else torch.zeros_like(self.features))
        fewest = [e.spec.dims["unet_batch"].min for e in (self.unet, self.shallow) if e is not None]
        plan = [_step_plan(batch.cfg[i], None if batch.full is None else batch.full[i], *fewest)
                for i in range(sampler.steps)]
        self.keys = [(len(full), len(shallow), count) for full, shallow, count, _, _ in plan]
        widest = [max(1, *(key[g] for key in self.keys)) for g in (0, 1)]
        self.plan = {"full": dev(np.stack([_pad(p[0], widest[0]) for p in plan]), np.int64),  # [steps, R]
                     "shallow": dev(np.stack([_pad(p[1], widest[1]) for p in plan]), np.int64),
                     "uncond": dev(np.stack([p[3] for p in plan]), np.int64),  # [steps, n]
                     "cond": dev(np.stack([p[4] for p in plan]), np.int64)}
        slot = lambda size: torch.zeros(size, dtype=torch.int64, device=self.device)  # noqa: E731
        for key in set(self.keys):
            if key not in self.rows:
                engines = ((self.unet, key[0], key[2]), (self.shallow, key[1], key[1]))
                self.rows[key] = [(engine, slot(size), slot(size), count) for engine, size, count in engines if size]

    def load(self, i: int) -> tuple:
        """Step i's slots from the tables (device to device: no host sync); returns its step key."""
        for k, table in self.tables.items():
            self.slots[k].copy_(table[i])
        self.t.copy_(self.timesteps[i])
        key = self.keys[i]
        for engine, rows, latent_rows, _ in self.rows[key]:
            rows.copy_(self.plan["full" if engine is self.unet else "shallow"][i, : len(rows)])
            latent_rows.copy_(rows % self.n)
        self.positions["uncond"].copy_(self.plan["uncond"][i])
        self.positions["cond"].copy_(self.plan["cond"][i])
        if self.noise is not None:
            self.noise.copy_(self.noise_table[i])
        return key

    def views(self, engine, size: int):
        """(context, views of ``engine``'s buffers) for a batch of ``size`` rows."""
        values = self._values(size)
        check_feeds(engine.spec, {t.name: np.empty(shape_of(t, values), np.float32) for t in engine.spec.inputs})
        context = engine.context if not engine.cuda_graph else engine.new_context()
        return context, engine.set_shapes(values, context)

    def body(self, calls: list) -> None:
        """Gather each call's inputs (a DeepCache row's feature too), the UNet graphs (the full one keeps its
        rows' features), per-row CFG, the sampler step, the history update."""
        import torch

        outputs = []
        for (engine, rows, latent_rows, count), context, v in calls:
            for name, value in self.conditioning.items():
                if name in engine.spec.input_names:
                    torch.index_select(value, 0, rows, out=v[name])
            torch.index_select(self.x, 0, latent_rows, out=v["sample"])
            v["sample"].div_(self.slots["divisor"])
            v["timestep"].copy_(self.t.reshape(1))
            if engine is self.shallow:
                torch.index_select(self.features, 0, rows, out=v["deep_feature"])
            engine.enqueue(context)
            if engine is self.unet and self.features is not None:
                self.features.index_copy_(0, rows[:count], v["deep_feature"][:count])
            outputs.append(v["noise_pred"])
        eps = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
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

    def step(self, key: tuple) -> None:
        """Run the body of step ``key``: replay its graph (captured on first use), or run it; count the rows."""
        found = self.graphs.get(key)
        if found is None:
            calls = [(call, *self.views(call[0], len(call[1]))) for call in self.rows[key]]
            graph = _capture(self, calls) if self.unet.cuda_graph else None
            found = self.graphs[key] = (graph, calls)
        graph, calls = found
        if graph is not None:
            graph.replay()
        else:
            for (engine, rows, _, _), context, _ in calls:
                engine.set_shapes(self._values(len(rows)), context)
            self.body(calls)
        for (engine, rows, _, _), _, _ in calls:
            engine.runs += 1
            engine.rows += len(rows)


def _coefficient_tables(sampler: SamplerTables) -> dict:
    """The per-step scalar and vector tables of a sampler ([steps] or [steps, K]); absent terms left out."""
    tables = {k: getattr(sampler, k) for k in _SCALARS if getattr(sampler, k) is not None}
    tables["sigma"] = sampler.sigmas[: sampler.steps]
    tables["b"] = sampler.b
    if sampler.d is not None:
        tables["d"] = sampler.d
    return tables


def _step_plan(cfg_step: np.ndarray, full_step: Optional[np.ndarray], fewest: int, fewest_shallow: int = 1) -> tuple:
    """(conditioning rows of the full unet's batch, of the shallow one's, the full rows before padding, each
    image's uncond position, its cond position); positions index the full call's outputs, then the shallow's."""
    guided, rows = step_rows(cfg_step, fewest)
    cond = len(guided) + np.arange(len(cfg_step))
    uncond = cond.copy()
    uncond[guided] = np.arange(len(guided))
    if full_step is None:
        return rows, rows[:0], len(rows), uncond, cond
    on_full, on_shallow = split_step(rows, len(cond) + len(guided), full_step)
    full, shallow = pad_rows(rows[on_full], fewest), pad_rows(rows[on_shallow], fewest_shallow)
    where = np.empty(len(on_full) + len(on_shallow), np.int64)  # step_rows position -> output row
    where[on_full], where[on_shallow] = np.arange(len(on_full)), len(full) + np.arange(len(on_shallow))
    return full, shallow, len(on_full), where[uncond], where[cond]


def _pad(values: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([values, np.zeros(size - len(values), values.dtype)])


def _capture(loop: _Loop, calls: list):
    """The body of one step key as a CUDA graph on execution contexts of its own, whose shapes never change."""
    unet = loop.unet
    for (engine, _, _, _), context, _ in calls:
        check = getattr(context, "is_stream_capturable", None)  # where the installed TensorRT has it
        if check is not None and not check(unet.stream.cuda_stream):
            logger.warning("%s: this execution context cannot be captured on its stream; steps run without a CUDA "
                           "graph", engine.name)
            unet.cuda_graph = False
            return None
    for (engine, _, _, _), context, _ in calls:
        engine.enqueue(context)  # TensorRT needs one launch before capture (lazy initialisation); writes its outputs
    graph = unet.device.CUDAGraph()
    with unet.device.graph(graph, stream=unet.stream):
        loop.body(calls)  # recorded, not run
    return graph


def denoise_device(unet, batch: DenoiseBatch, sampler: SamplerTables, on_step: Optional[StepCallback] = None,
                   shallow=None) -> np.ndarray:
    """The denoising loop on the device; the contract of engine.Backend.denoise. ``shallow``: DeepCache's
    unet_shallow engine (needed when ``batch.full`` is set)."""
    previous = [np.zeros_like(batch.latents)] * max(sampler.history - 1, 0)
    base, start, features = batch.latents, 0, None
    if batch.full is not None and shallow is None:
        raise BackendError("denoise_device: a DeepCache batch (batch.full) needs the unet_shallow engine")
    with unet.device.stream(unet.stream):
        while True:
            key = _Loop.key(batch, sampler)
            loop = unet.graphs.get(key) if unet.cuda_graph else None
            if loop is None:
                loop = _Loop(unet, batch, sampler, shallow)
                if unet.cuda_graph:
                    unet.graphs[key] = loop
            loop.start(batch, sampler, previous, base, features)
            keep = None
            for i in range(start, sampler.steps):
                loop.step(loop.load(i))
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
            if loop.features is not None:  # rare (a cancelled request): the survivors' features via the host
                features = host_copy(loop.features)[conditioning_rows(keep, batch.n)]
            batch = batch.keep(keep, out[keep])
    return out  # rows of several requests: the pipeline checks each request's rows


__all__ = ["denoise_device"]
