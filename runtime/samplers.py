"""Samplers: diffusers' schedulers as per-step coefficient tables, and one step function for all of them.

    name               diffusers class, built with from_config(the folder's config, **overrides)
    euler (default)    EulerDiscreteScheduler
    euler_a            EulerAncestralDiscreteScheduler
    dpmpp_2m           DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2
    dpmpp_2m_karras    the same with use_karras_sigmas=True
    unipc              UniPCMultistepScheduler

Every step of every sampler is one linear combination with per-step scalars
(``sampler_step``), for each image row:

    y      = p_i * x + q_i * m                   the data prediction (x0) from the model output m
    base   = f_i * x + g_i * s + sum_k d_ik H_k  UniPC's corrector (s: the previous base); else base = x
    x'     = a_i * base + sum_k b_ik * H_k       multistep update over the history H = [y_i, y_i-1, ...]
             + dt_i * (base - y) / sigma_i       Euler's derivative step (diffusers' operation order)
             + c_i * noise_i                     ancestral noise (euler_a)

``sampler_tables`` computes the scalars once per (sampler, steps) as diffusers
computes them (float32 sigmas, alphas and lambdas, float64 where diffusers
uses numpy); the numpy loop (backend_ort.py) and the on-device loop read the
same tables, so the math is stated once here. Terms a sampler does not have
are absent from its tables (None, or no history), not multiplied by zero.
Euler's step performs diffusers' float32 operations in diffusers' order, so
its numbers are diffusers' bit for bit; the multistep solvers combine the
same scalars in another order (about 1e-7 relative per step).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .errors import InputError
from .scheduler import (
    SchedulerConfig,
    SchedulerConfigError,
    alphas_cumprod,
    check_settings,
    check_steps,
    euler_timesteps,
    karras_sigmas,
    multistep_timesteps,
    sigma_to_t,
    train_sigmas,
)

F32 = np.float32
SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SAMPLER = "euler"
_BETAS = ("linear", "scaled_linear")
_SPACINGS = ("leading", "trailing", "linspace")
_OFF = (False, None, 0)
# What the runtime implements of each class's settings (anything else: SchedulerConfigError).
_ALLOWED = {
    "EulerDiscreteScheduler": dict(beta_schedule=_BETAS, timestep_spacing=_SPACINGS, rescale_betas_zero_snr=_OFF,
                                   prediction_type=("epsilon", "v_prediction", "sample", "original_sample"),
                                   interpolation_type=("linear",), timestep_type=("discrete",),
                                   final_sigmas_type=("zero", "sigma_min"), use_karras_sigmas=_OFF,
                                   use_exponential_sigmas=_OFF, use_beta_sigmas=_OFF),
    "EulerAncestralDiscreteScheduler": dict(beta_schedule=_BETAS, timestep_spacing=_SPACINGS,
                                            rescale_betas_zero_snr=_OFF, prediction_type=("epsilon", "v_prediction")),
    "DPMSolverMultistepScheduler": dict(beta_schedule=_BETAS, timestep_spacing=_SPACINGS, rescale_betas_zero_snr=_OFF,
                                        prediction_type=("epsilon", "v_prediction", "sample"),
                                        algorithm_type=("dpmsolver++",), solver_order=(1, 2),
                                        solver_type=("midpoint", "heun"), final_sigmas_type=("zero", "sigma_min"),
                                        thresholding=_OFF, variance_type=(None,), use_lu_lambdas=_OFF,
                                        use_exponential_sigmas=_OFF, use_beta_sigmas=_OFF, use_flow_sigmas=_OFF,
                                        use_dynamic_shifting=_OFF),
    "UniPCMultistepScheduler": dict(beta_schedule=_BETAS, timestep_spacing=_SPACINGS, rescale_betas_zero_snr=_OFF,
                                    prediction_type=("epsilon", "v_prediction", "sample"), solver_order=(1, 2, 3),
                                    solver_type=("bh1", "bh2"), predict_x0=(True, False),
                                    final_sigmas_type=("zero", "sigma_min"), thresholding=_OFF, solver_p=(None,),
                                    use_exponential_sigmas=_OFF, use_beta_sigmas=_OFF, use_flow_sigmas=_OFF,
                                    use_dynamic_shifting=_OFF),
}


class SamplerError(InputError):
    """An unknown sampler name."""


class StepCoefficients(NamedTuple):
    """The scalars of one step (numpy float32, or 0-dim device tensors in the on-device loop); None = no term."""

    sigma: object
    divisor: object  # the UNet input is x / divisor
    p: object
    q: object
    a: object
    b: object  # [K]
    dt: object
    c: object
    f: object
    g: object
    d: object  # [K]


@dataclass(frozen=True, eq=False)
class SamplerTables:
    """One sampler at one step count: per-step scalars, float32, read-only. ``history`` (K) is how many data
    predictions a step reads (0 for the Euler samplers, whose derivative step uses the current one only)."""

    name: str
    steps: int
    timesteps: np.ndarray  # [n]: the UNet's t
    sigmas: np.ndarray  # [n + 1]: sigma at the start of each step (diffusers' scheduler.sigmas), then the last
    init_noise_sigma: np.float32
    divisor: np.ndarray  # [n]
    p: np.ndarray  # [n]
    q: np.ndarray  # [n]
    a: np.ndarray  # [n]
    b: np.ndarray  # [n, K]
    dt: Optional[np.ndarray] = None  # [n] Euler samplers
    c: Optional[np.ndarray] = None  # [n] euler_a
    f: Optional[np.ndarray] = None  # [n] UniPC
    g: Optional[np.ndarray] = None  # [n] UniPC
    d: Optional[np.ndarray] = None  # [n, K] UniPC

    @property
    def history(self) -> int:
        return self.b.shape[1]

    @property
    def stochastic(self) -> bool:
        """It draws noise at every step (from the request's generator, after the initial latents)."""
        return self.c is not None

    def at(self, i: int) -> StepCoefficients:
        pick = lambda table: None if table is None else table[i]  # noqa: E731
        return StepCoefficients(self.sigmas[i], self.divisor[i], self.p[i], self.q[i], self.a[i], self.b[i],
                                pick(self.dt), pick(self.c), pick(self.f), pick(self.g), pick(self.d))


def sampler_step(k: StepCoefficients, x, model_output, previous: Sequence, base, noise=None):
    """One step of any sampler for a batch of rows: numpy arrays with float32 scalars, or torch tensors with
    0-dim tensors (the operators are all it uses). ``previous``: the K - 1 data predictions before this step,
    newest first; ``base``: the previous step's base (UniPC's corrected sample). Returns (x', y, base)."""
    y = x * k.p + model_output * k.q
    history = (y, *previous)
    if k.f is not None:
        base = x * k.f + base * k.g
        for j in range(len(k.d)):
            base = base + history[j] * k.d[j]
    else:
        base = x
    out = base * k.a
    for j in range(len(k.b)):
        out = out + history[j] * k.b[j]
    if k.dt is not None:
        out = out + ((base - y) / k.sigma) * k.dt
    if k.c is not None:
        out = out + noise * k.c
    return out, y, base


def _alpha_sigma(sigma):
    """diffusers' ``_sigma_to_alpha_sigma_t`` in float32: (1 / sqrt(sigma^2 + 1), sigma * that)."""
    alpha = F32(1) / np.sqrt(sigma * sigma + F32(1))
    return alpha, sigma * alpha


def _lambda(sigma):
    alpha, sig = _alpha_sigma(sigma)
    with np.errstate(divide="ignore"):  # sigma 0 (the last step): lambda is +inf, as in torch
        return np.log(alpha) - np.log(sig)


def _conversion(kind: str, sigma, x0: bool = True) -> tuple[float, float]:
    """(p, q) of the data prediction (x0; the noise prediction for UniPC's predict_x0=False) in the multistep
    solvers' variance-preserving latents."""
    alpha, sig = _alpha_sigma(sigma)
    alpha, sig = float(alpha), float(sig)
    if x0:
        return {"epsilon": (1 / alpha, -sig / alpha), "sample": (0.0, 1.0), "v_prediction": (alpha, -sig)}[kind]
    return {"epsilon": (0.0, 1.0), "sample": (1 / sig, -alpha / sig), "v_prediction": (sig, alpha)}[kind]


def _euler_sigmas(s: SimpleNamespace, n: int, final: str):
    timesteps = euler_timesteps(s, n)
    table = train_sigmas(s)
    sigmas = np.interp(timesteps, np.arange(0, len(table)), table)  # float64, as diffusers
    sigmas = np.concatenate([sigmas, [table[0] if final == "sigma_min" else 0.0]]).astype(F32)
    top = sigmas.max()
    init = top if s.timestep_spacing in ("linspace", "trailing") else F32(np.sqrt(top * top + F32(1)))
    return timesteps, sigmas, F32(init)


def _euler(s: SimpleNamespace, n: int, ancestral: bool) -> dict:
    timesteps, sigmas, init = _euler_sigmas(s, n, "zero" if ancestral else s.final_sigmas_type)
    sig = sigmas[:n]
    one = F32(1)
    if s.prediction_type == "epsilon":
        p, q = np.ones(n, F32), -sig
    elif s.prediction_type == "v_prediction":
        p, q = one / (sig * sig + one), -sig / np.sqrt(sig * sig + one)
    else:  # "sample" / "original_sample"
        p, q = np.zeros(n, F32), np.ones(n, F32)
    tables = dict(timesteps=timesteps, sigmas=sigmas, init_noise_sigma=init, divisor=np.sqrt(sig * sig + one),
                  p=p, q=q, a=np.ones(n, F32), b=np.zeros((n, 0), F32))
    if not ancestral:
        return dict(tables, dt=sigmas[1:] - sig)
    up, down = [], []
    for i in range(n):  # diffusers' float32 scalar arithmetic
        frm, to = sigmas[i], sigmas[i + 1]
        up.append(np.sqrt(to**2 * (frm**2 - to**2) / frm**2))
        down.append(np.sqrt(to**2 - up[-1] ** 2))
    return dict(tables, dt=np.array(down, F32) - sig, c=np.array(up, F32))


def _multistep_sigmas(s: SimpleNamespace, n: int, last_timestep: int, karras_min_last: bool):
    """Timesteps (float32 for the UNet) and sigmas [n + 1] of a multistep solver. ``karras_min_last``: UniPC ends
    a Karras schedule in its own smallest sigma under final_sigmas_type "sigma_min"; DPM in the table's."""
    timesteps = multistep_timesteps(s, n, last_timestep)
    table = train_sigmas(s)
    last = table[0]
    if s.use_karras_sigmas:
        sigmas = karras_sigmas(s, table, n)
        timesteps = sigma_to_t(sigmas, np.log(table)).round().astype(np.int64)
        last = sigmas[-1] if karras_min_last else last
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
    last = last if s.final_sigmas_type == "sigma_min" else 0.0
    return timesteps.astype(F32), np.concatenate([sigmas, [last]]).astype(F32)


def _dpm(s: SimpleNamespace, n: int) -> dict:
    cumprod = alphas_cumprod(s)
    lambdas = np.log(np.sqrt(cumprod)) - np.log(np.sqrt(F32(1) - cumprod))
    clipped = int(np.searchsorted(np.flip(lambdas), s.lambda_min_clipped))
    timesteps, sigmas = _multistep_sigmas(s, n, s.num_train_timesteps - clipped, karras_min_last=False)
    rows = {k: [] for k in ("p", "q", "a", "b")}
    for i in range(n):
        p, q = _conversion(s.prediction_type, sigmas[i])
        last = i == n - 1 and (s.euler_at_final or (s.lower_order_final and n < 15) or s.final_sigmas_type == "zero")
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
        _, sigma_s0 = _alpha_sigma(sigmas[i])
        h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
        c = float(alpha_t * (np.exp(-h) - F32(1)))
        b = [-c, 0.0]
        if not (s.solver_order == 1 or i == 0 or last):  # second order (multistep_dpm_solver_second_order_update)
            inv_r0 = float(F32(1) / ((_lambda(sigmas[i]) - _lambda(sigmas[i - 1])) / h))
            if s.solver_type == "midpoint":
                b = [-c - 0.5 * c * inv_r0, 0.5 * c * inv_r0]
            else:  # heun
                e = float(alpha_t * ((np.exp(-h) - F32(1)) / h + F32(1)))
                b = [-c + e * inv_r0, -e * inv_r0]
        for key, value in zip("pqab", (p, q, float(sigma_t / sigma_s0), b[: s.solver_order])):
            rows[key].append(value)
    return dict(timesteps=timesteps, sigmas=sigmas, init_noise_sigma=F32(1), divisor=np.ones(n, F32),
                **{k: np.array(v, F32) for k, v in rows.items()})


def _unipc_weights(s: SimpleNamespace, sigmas, t: int, s0: int, order: int, corrector: bool):
    """One UniP / UniC update from sigma index s0 to t of the given order: (scale ratio, coefficient of the
    newest history entry m0, [coefficients of the older D1 entries], coefficient of the new model output)."""
    x0 = s.predict_x0
    alpha_t, sigma_t = _alpha_sigma(sigmas[t])
    alpha_s0, sigma_s0 = _alpha_sigma(sigmas[s0])
    h = _lambda(sigmas[t]) - _lambda(sigmas[s0])
    rks = [(_lambda(sigmas[s0 - i]) - _lambda(sigmas[s0])) / h for i in range(1, order)] + [F32(1)]
    hh = -h if x0 else h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - F32(1)
    b_h = hh if s.solver_type == "bh1" else np.expm1(hh)
    big_r, b, factorial = [], [], 1
    for i in range(1, order + 1):
        big_r.append(np.power(np.array(rks, F32), i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - F32(1) / F32(factorial)
    big_r, b = np.stack(big_r).astype(F32), np.array(b, F32)
    if corrector:
        rhos = np.array([0.5], F32) if order == 1 else np.linalg.solve(big_r, b).astype(F32)
    else:
        rhos = np.array([0.5], F32) if order == 2 else (
            np.linalg.solve(big_r[:-1, :-1], b[:-1]).astype(F32) if order > 2 else np.zeros(0, F32))
    wide = np.float64  # compose in float64; a zero ratio gives diffusers' inf / nan, not an exception
    out, bh = wide(alpha_t if x0 else sigma_t), wide(b_h)
    scale = wide(sigma_t / sigma_s0) if x0 else wide(alpha_t / alpha_s0)
    older = [-out * bh * wide(rhos[k]) / wide(rks[k]) for k in range(order - 1)]
    # D1_k = (m_k - m0) / r_k: each older term takes its share off m0. diffusers multiplies B(h) by the residual
    # even when it is 0 (first order): B(h) = -inf (bh1 at sigma 0) makes its latents NaN, and these coefficients
    newest = -out * wide(h_phi_1) - sum(older) - out * bh * 0.0
    new = -out * bh * wide(rhos[-1]) if corrector else 0.0
    return scale, newest - new, older, new


def _unipc(s: SimpleNamespace, n: int) -> dict:
    timesteps, sigmas = _multistep_sigmas(s, n, s.num_train_timesteps, karras_min_last=True)
    big_k = s.solver_order + 1
    rows = {k: [] for k in ("p", "q", "a", "b", "f", "g", "d")}
    orders = [min(s.solver_order, n - i if s.lower_order_final else s.solver_order, i + 1) for i in range(n)]
    for i in range(n):
        p, q = _conversion(s.prediction_type, sigmas[i], s.predict_x0)
        f, g, d = 1.0, 0.0, [0.0] * big_k
        if i > 0 and (i - 1) not in s.disable_corrector:  # UniC: base = g * s + d . [y_i, y_i-1, ...]
            g, m0, older, new = _unipc_weights(s, sigmas, i, i - 1, orders[i - 1], corrector=True)
            f, d = 0.0, [new, m0, *older] + [0.0] * (big_k - 2 - len(older))
        a, m0, older, _ = _unipc_weights(s, sigmas, i + 1, i, orders[i], corrector=False)
        b = [m0, *older] + [0.0] * (big_k - 1 - len(older))
        for key, value in zip("pqafgbd", (p, q, a, f, g, b, d)):
            rows[key].append(value)
    return dict(timesteps=timesteps, sigmas=sigmas, init_noise_sigma=F32(1), divisor=np.ones(n, F32),
                **{k: np.array(v, F32) for k, v in rows.items()})


_BUILDERS = {
    "EulerDiscreteScheduler": lambda s, n: _euler(s, n, ancestral=False),
    "EulerAncestralDiscreteScheduler": lambda s, n: _euler(s, n, ancestral=True),
    "DPMSolverMultistepScheduler": _dpm,
    "UniPCMultistepScheduler": _unipc,
}


def sampler_settings(config: SchedulerConfig, name: str) -> SimpleNamespace:
    """The checked settings of sampler ``name`` on this config; SamplerError / SchedulerConfigError."""
    if name not in SAMPLERS:
        raise SamplerError(f"scheduler {name!r} is not one of the samplers: {', '.join(SAMPLERS)}")
    class_name, overrides = SAMPLERS[name]
    s = config.settings(class_name, overrides)
    check_settings(s, f"{config.source} as {class_name} (scheduler {name!r})", _ALLOWED[class_name])
    return s


def sampler_tables(config: SchedulerConfig, name: str, steps: int) -> SamplerTables:
    """The tables of sampler ``name`` for ``steps`` steps (no cache; ``Samplers`` caches)."""
    s = sampler_settings(config, name)
    n = check_steps(s, steps)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        values = _BUILDERS[SAMPLERS[name][0]](s, n)
    tables = SamplerTables(name, n, **values)
    for key, value in vars(tables).items():
        if isinstance(value, np.ndarray):
            if not np.all(np.isfinite(value)):
                raise SchedulerConfigError(f"{config.source}: scheduler {name!r} at {n} steps gives non-finite "
                                           f"{key} coefficients; choose another step count or sampler")
            value.setflags(write=False)
    return tables


class Samplers:
    """The samplers of one model folder: its scheduler config and the tables per (sampler, steps), each built
    once (thread-safe)."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._tables: dict = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        """The samplers this folder's config supports (every name, for Kolors' config)."""
        usable = []
        for name in SAMPLERS:
            try:
                sampler_settings(self.config, name)
            except SchedulerConfigError:
                continue
            usable.append(name)
        return tuple(usable)

    def tables(self, name: str, steps: int) -> SamplerTables:
        key = (name, steps)
        with self._lock:
            found = self._tables.get(key)
        if found is None:
            found = sampler_tables(self.config, name, steps)
            with self._lock:
                found = self._tables.setdefault(key, found)
        return found


__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "SamplerError", "SamplerTables", "Samplers", "StepCoefficients",
           "sampler_settings", "sampler_step", "sampler_tables"]
