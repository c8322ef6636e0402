"""The model folder's scheduler config and the noise schedules of diffusers' schedulers, in numpy.

Kolors ships ``scheduler/scheduler_config.json`` for diffusers'
``EulerDiscreteScheduler``; the model folder carries a copy. A sampler is built
from it the way diffusers builds a scheduler with ``Class.from_config(config,
**overrides)``: each class reads the keys its constructor knows (its own default
for a key the file lacks), ignores the others, and the overrides win
(``SchedulerConfig.settings``). ``CLASS_DEFAULTS`` states those keys and defaults
for the four classes the samplers use (tests/test_scheduler.py checks them
against diffusers' signatures).

diffusers builds the training noise table in torch float32; the numbers here
are bit-identical to it but for float32 sqrt (checked in
tests/test_scheduler.py), which takes two details of torch's CPU kernels:
- ``torch.linspace`` (float32) rounds ``start + step * i`` once (fused
  multiply-add) and counts the upper half of the points back from ``end``;
- ``torch.cumprod`` accumulates in float64 and rounds each partial product to
  float32.
The inference timesteps and sigmas follow each class's ``set_timesteps``,
numpy code as diffusers writes it (samplers.py builds the per-step tables).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Mapping

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
               prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)
_SIGMA_SCHEDULES = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_MULTISTEP = dict(solver_order=2, thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                  lower_order_final=True, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                  use_dynamic_shifting=False, time_shift_type="exponential")
# The constructor keys of each diffusers class and their defaults (diffusers 0.42).
CLASS_DEFAULTS = {
    "EulerDiscreteScheduler": {**_COMMON, **_SIGMA_SCHEDULES, "interpolation_type": "linear", "sigma_min": None,
                               "sigma_max": None, "timestep_type": "discrete", "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": dict(_COMMON),
    "DPMSolverMultistepScheduler": {**_COMMON, **_SIGMA_SCHEDULES, **_MULTISTEP, "algorithm_type": "dpmsolver++",
                                    "solver_type": "midpoint", "euler_at_final": False, "use_lu_lambdas": False,
                                    "lambda_min_clipped": -math.inf, "variance_type": None},
    "UniPCMultistepScheduler": {**_COMMON, **_SIGMA_SCHEDULES, **_MULTISTEP, "predict_x0": True, "solver_type": "bh2",
                                "disable_corrector": [], "solver_p": None, "sigma_min": None, "sigma_max": None,
                                "shift_terminal": None},
}
# Values a class's constructor rewrites (diffusers registers the replacement in its config).
_RENAMED = {
    "DPMSolverMultistepScheduler": {"algorithm_type": {"deis": "dpmsolver++"},
                                    "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}},
    "UniPCMultistepScheduler": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
}


class SchedulerConfigError(InputError):
    """scheduler_config.json (with a sampler's overrides) asks for something the runtime does not reproduce."""


class SchedulerStepError(InputError):
    """A step count outside the schedule."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys of a diffusers scheduler_config.json as diffusers' ``from_config`` sees them: private keys and
    the keys listed in ``_use_default_values`` (defaults the file did not set) left out."""

    values: Mapping = field(default_factory=dict)
    source: str = "scheduler config"

    @classmethod
    def from_dict(cls, config: Mapping, source: str = "scheduler config") -> "SchedulerConfig":
        if not isinstance(config, Mapping):
            raise SchedulerConfigError(f"{source}: expected a JSON object, found {type(config).__name__}")
        defaulted = set(config.get("_use_default_values") or ())
        values = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
        return cls(values, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        """Read scheduler_config.json (or a folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SchedulerConfigError(
                f"scheduler config {path}: cannot read it as JSON ({err}); "
                "the model folder should hold the checkpoint's scheduler/scheduler_config.json"
            ) from err
        return cls.from_dict(config, source=str(path))

    def settings(self, class_name: str, overrides: Mapping) -> SimpleNamespace:
        """``class_name.from_config(this config, **overrides).config`` as attributes. ``sigma_min``/``sigma_max``
        are always present: diffusers' Karras schedule reads them from the config even in classes whose
        constructor lacks them (there they come from the file, else None)."""
        defaults = CLASS_DEFAULTS[class_name]
        chosen = {k: self.values.get(k, d) for k, d in defaults.items()}
        chosen.update(overrides)
        for key, table in _RENAMED.get(class_name, {}).items():
            chosen[key] = table.get(chosen[key], chosen[key])
        for key in ("sigma_min", "sigma_max"):
            chosen.setdefault(key, self.values.get(key))
        return SimpleNamespace(**chosen)


def check_settings(s: SimpleNamespace, where: str, allowed: Mapping[str, tuple]) -> None:
    """Values the runtime implements: ``allowed`` maps a key to its accepted values; plus the common numbers."""
    for key, values in allowed.items():
        if key == "beta_schedule" and s.trained_betas is not None:
            continue
        if getattr(s, key) not in values:
            raise SchedulerConfigError(f"{where}: {key}={getattr(s, key)!r} is not implemented by the runtime; "
                                       f"expected one of {', '.join(map(repr, values))} (or sample with diffusers)")
    if isinstance(s.num_train_timesteps, bool) or not isinstance(s.num_train_timesteps, int) \
            or s.num_train_timesteps < 2:
        raise SchedulerConfigError(f"{where}: num_train_timesteps must be an int >= 2, found {s.num_train_timesteps!r}")
    if isinstance(s.steps_offset, bool) or not isinstance(s.steps_offset, int):
        raise SchedulerConfigError(f"{where}: steps_offset must be an int, found {s.steps_offset!r}")
    if s.trained_betas is not None and len(s.trained_betas) != s.num_train_timesteps:
        raise SchedulerConfigError(f"{where}: trained_betas has {len(s.trained_betas)} values, expected "
                                   f"num_train_timesteps={s.num_train_timesteps}")


def check_steps(s: SimpleNamespace, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise SchedulerStepError(f"scheduler: num_inference_steps must be an int, found {type(steps).__name__}")
    if not 1 <= steps <= s.num_train_timesteps:
        raise SchedulerStepError(f"scheduler: num_inference_steps must be between 1 and {s.num_train_timesteps} "
                                 f"(num_train_timesteps), found {steps}")
    return int(steps)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit."""
    lo, hi = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([lo], dtype=np.float32)
    step = np.float32((hi - lo) / np.float32(steps - 1))
    i = np.arange(steps)
    # float64 holds step * i exactly, so one rounding to float32 below is the fused multiply-add
    up = np.float64(lo) + np.float64(step) * i
    down = np.float64(hi) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def alphas_cumprod(s: SimpleNamespace) -> np.ndarray:
    """diffusers' ``alphas_cumprod`` over the training timesteps, float32 [T]."""
    if s.trained_betas is not None:
        betas = np.asarray(s.trained_betas, dtype=np.float32)
    elif s.beta_schedule == "linear":
        betas = torch_linspace_f32(s.beta_start, s.beta_end, s.num_train_timesteps)
    else:  # scaled_linear
        root = torch_linspace_f32(s.beta_start**0.5, s.beta_end**0.5, s.num_train_timesteps)
        betas = root * root
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def train_sigmas(s: SimpleNamespace) -> np.ndarray:
    """sqrt((1 - alphas_cumprod) / alphas_cumprod) over the training timesteps, float32 [T]."""
    cumprod = alphas_cumprod(s)
    return np.sqrt((np.float32(1.0) - cumprod) / cumprod)


def euler_timesteps(s: SimpleNamespace, n: int) -> np.ndarray:
    """The timesteps of the Euler schedulers' set_timesteps, float32 [n], descending."""
    train = s.num_train_timesteps
    if s.timestep_spacing == "linspace":
        return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
    if s.timestep_spacing == "leading":
        ratio = train // n
        t = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return t + np.float32(s.steps_offset)
    ratio = train / n  # trailing
    return np.arange(train, 0, -ratio).round().astype(np.float32) - np.float32(1)


def multistep_timesteps(s: SimpleNamespace, n: int, last_timestep: int) -> np.ndarray:
    """The timesteps of the multistep solvers' set_timesteps (n + 1 points, the last dropped), int64 [n]."""
    if s.timestep_spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if s.timestep_spacing == "leading":
        ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + s.steps_offset
    ratio = s.num_train_timesteps / n  # trailing
    return np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64) - 1


def karras_sigmas(s: SimpleNamespace, table: np.ndarray, n: int) -> np.ndarray:
    """Karras et al. (2022) sigmas between the table's ends (or the config's sigma_min / sigma_max), float64 [n]."""
    descending = np.flip(table).copy()
    sigma_min = s.sigma_min if s.sigma_min is not None else descending[-1].item()
    sigma_max = s.sigma_max if s.sigma_max is not None else descending[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t``: a sigma's (fractional) training timestep by interpolating log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


__all__ = ["CLASS_DEFAULTS", "SchedulerConfig", "SchedulerConfigError", "SchedulerStepError", "alphas_cumprod",
           "check_settings", "check_steps", "euler_timesteps", "karras_sigmas", "multistep_timesteps", "sigma_to_t",
           "torch_linspace_f32", "train_sigmas"]
