"""Euler discrete sampling in numpy, reproducing diffusers' EulerDiscreteScheduler.

Kolors ships ``scheduler/scheduler_config.json`` for diffusers'
``EulerDiscreteScheduler``; the engine folder carries a copy and this module
reads it. Only the options a deterministic Euler sampler needs are implemented
(see ``SchedulerConfig``); any other setting raises ``SchedulerConfigError``
rather than sampling with a schedule the reference would not produce.

diffusers builds the noise schedule in torch float32; the numbers here are
bit-identical to it (checked in tests/test_scheduler.py), which takes two
details of torch's CPU kernels:
- ``torch.linspace`` (float32) rounds ``start + step * i`` once (fused
  multiply-add) and counts the upper half of the points back from ``end``;
- ``torch.cumprod`` accumulates in float64 and rounds each partial product to
  float32.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)

SCHEDULER_CLASS = "EulerDiscreteScheduler"
SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")
FINAL_SIGMAS = ("zero", "sigma_min")


class SchedulerConfigError(InputError):
    """scheduler_config.json asks for something this sampler does not reproduce."""


class SchedulerStepError(InputError):
    """A sampling call is outside the schedule (step count, step index, shapes)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """The EulerDiscreteScheduler settings that change the numbers.

    Field defaults are diffusers' constructor defaults, so a config file that
    leaves a key out means what it means to diffusers.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    @classmethod
    def from_dict(cls, config: Mapping, source: str = "scheduler config") -> "SchedulerConfig":
        """Read a diffusers scheduler_config.json dict; ``source`` names it in errors."""
        name = config.get("_class_name")
        if name is not None and name != SCHEDULER_CLASS:
            raise SchedulerConfigError(
                f"{source}: _class_name is {name!r}, expected {SCHEDULER_CLASS!r}; "
                "the runtime implements only Euler discrete sampling, export with that scheduler"
            )
        unsupported = {
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "rescale_betas_zero_snr": False,
        }
        for key, wanted in unsupported.items():
            if bool(config.get(key) or False) != wanted:
                raise SchedulerConfigError(
                    f"{source}: {key}={config.get(key)!r} is not implemented by the runtime's Euler sampler "
                    f"(expected {wanted}); set it to {wanted} or sample with diffusers"
                )
        known = {f.name for f in fields(cls)}
        ignored = sorted(k for k in config if k not in known and k not in unsupported and not k.startswith("_"))
        if ignored:
            logger.debug("%s: ignoring keys Euler sampling does not use: %s", source, ", ".join(ignored))
        values = {k: config[k] for k in known if k in config and config[k] is not None}
        if "trained_betas" in values:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        made = cls(**values)
        made._check(source)
        return made

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
                "the engine folder should hold the checkpoint's scheduler/scheduler_config.json"
            ) from err
        if not isinstance(config, dict):
            raise SchedulerConfigError(f"scheduler config {path}: expected a JSON object, found {type(config).__name__}")
        return cls.from_dict(config, source=str(path))

    def _check(self, source: str) -> None:
        choices = {
            "timestep_spacing": (self.timestep_spacing, SPACINGS),
            "beta_schedule": (self.beta_schedule, BETA_SCHEDULES),
            "prediction_type": (self.prediction_type, PREDICTION_TYPES),
            "interpolation_type": (self.interpolation_type, ("linear",)),
            "timestep_type": (self.timestep_type, ("discrete",)),
            "final_sigmas_type": (self.final_sigmas_type, FINAL_SIGMAS),
        }
        for key, (value, allowed) in choices.items():
            if key == "beta_schedule" and self.trained_betas is not None:
                continue
            if value not in allowed:
                raise SchedulerConfigError(
                    f"{source}: {key}={value!r} is not implemented by the runtime's Euler sampler; "
                    f"expected one of {', '.join(map(repr, allowed))}"
                )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise SchedulerConfigError(
                f"{source}: trained_betas has {len(self.trained_betas)} values, "
                f"expected num_train_timesteps={self.num_train_timesteps}"
            )
        if self.num_train_timesteps < 2:
            raise SchedulerConfigError(f"{source}: num_train_timesteps must be at least 2, found {self.num_train_timesteps}")


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


def train_sigmas(config: SchedulerConfig) -> np.ndarray:
    """sqrt((1 - alphas_cumprod) / alphas_cumprod) over the training timesteps, float32 [T]."""
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = torch_linspace_f32(config.beta_start, config.beta_end, config.num_train_timesteps)
    else:  # scaled_linear
        root = torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps)
        betas = root * root
    alphas = np.float32(1.0) - betas
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def inference_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps diffusers' set_timesteps picks, float32 [n], descending."""
    n, train = num_inference_steps, config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, train - 1, n, dtype=np.float32)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = train // n
        t = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        return t + np.float32(config.steps_offset)
    ratio = train / n  # trailing
    return np.arange(train, 0, -ratio).round().astype(np.float32) - np.float32(1)


class EulerDiscreteScheduler:
    """One Euler schedule for a fixed number of steps.

    ``timesteps`` [n] float32 go to the UNet; ``sigmas`` [n + 1] float32 end in
    the final sigma. Unlike diffusers there is no hidden step counter: callers
    pass the step index.
    """

    def __init__(self, config: SchedulerConfig, num_inference_steps: int):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise SchedulerStepError(
                f"scheduler: num_inference_steps must be an int, found {type(num_inference_steps).__name__}"
            )
        if not 1 <= num_inference_steps <= config.num_train_timesteps:
            raise SchedulerStepError(
                f"scheduler: num_inference_steps must be between 1 and {config.num_train_timesteps} "
                f"(num_train_timesteps), found {num_inference_steps}"
            )
        self.config = config
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = inference_timesteps(config, self.num_inference_steps)  # [n] float32
        table = train_sigmas(config)  # [T] float32
        sigmas = np.interp(self.timesteps, np.arange(0, len(table)), table)  # float64, as diffusers
        last = table[0] if config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)  # [n + 1]
        max_sigma = self.sigmas.max()
        if config.timestep_spacing in ("linspace", "trailing"):
            self.init_noise_sigma = np.float32(max_sigma)
        else:
            self.init_noise_sigma = np.float32(np.sqrt(max_sigma * max_sigma + np.float32(1)))

    def __len__(self) -> int:
        return self.num_inference_steps

    def _sigma(self, step_index: int) -> np.float32:
        if isinstance(step_index, bool) or not isinstance(step_index, (int, np.integer)):
            raise SchedulerStepError(f"scheduler: step_index must be an int, found {type(step_index).__name__}")
        if not 0 <= step_index < self.num_inference_steps:
            raise SchedulerStepError(
                f"scheduler: step_index {step_index} is outside the {self.num_inference_steps}-step schedule "
                f"(0..{self.num_inference_steps - 1})"
            )
        return self.sigmas[step_index]

    def input_divisor(self, step_index: int) -> np.float32:
        """sqrt(sigma^2 + 1) in float32; the UNet input is the latent divided by it."""
        sigma = self._sigma(step_index)
        return np.float32(np.sqrt(sigma * sigma + np.float32(1)))

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """sample / sqrt(sigma^2 + 1), float32 (diffusers divides; so do we, for the same rounding)."""
        return np.asarray(sample, dtype=np.float32) / self.input_divisor(step_index)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        """One Euler step from sigma[i] to sigma[i + 1]; returns the next latent, float32.

        The float32 operations and their order follow diffusers' step() with
        s_churn = 0. diffusers forms ``sigma * model_output`` in the model's
        dtype and casts the result back to it; the engines return float32, so
        everything here stays float32.
        """
        sigma = self._sigma(step_index)
        sigma_next = self.sigmas[step_index + 1]
        sample = np.asarray(sample, dtype=np.float32)
        model_output = np.asarray(model_output, dtype=np.float32)
        if model_output.shape != sample.shape:
            raise SchedulerStepError(
                f"scheduler step {step_index}: model_output has shape {model_output.shape}, "
                f"expected the latent's shape {sample.shape}"
            )
        one = np.float32(1)
        kind = self.config.prediction_type
        if kind == "epsilon":
            pred_original = sample - sigma * model_output
        elif kind == "v_prediction":
            c_out = -sigma / np.float32(np.sqrt(sigma * sigma + one))
            pred_original = model_output * c_out + sample / (sigma * sigma + one)
        else:  # "sample" / "original_sample"
            pred_original = model_output
        derivative = (sample - pred_original) / sigma
        dt = np.float32(sigma_next - sigma)
        return sample + derivative * dt


def load_scheduler(path: str | Path, num_inference_steps: int) -> EulerDiscreteScheduler:
    """The schedule for ``num_inference_steps`` from a scheduler_config.json (or its folder)."""
    return EulerDiscreteScheduler(SchedulerConfig.from_file(path), num_inference_steps)


__all__ = [
    "EulerDiscreteScheduler",
    "SchedulerConfig",
    "SchedulerConfigError",
    "SchedulerStepError",
    "load_scheduler",
]
