"""The numpy Euler sampler against diffusers' EulerDiscreteScheduler.

Timesteps, betas and alphas_cumprod match bit for bit. Sigmas match to one
float32 ulp: this CPU torch build's float32 sqrt is not correctly rounded (it
differs from IEEE sqrt by one ulp on roughly a sixth of inputs), and the
runtime uses IEEE sqrt, so sigmas, input scales and steps are compared with a
relative tolerance of a few ulps instead of exactly.
"""

import json

import numpy as np
import pytest

from kolors_trt.runtime.scheduler import (
    EulerDiscreteScheduler,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerStepError,
    load_scheduler,
    torch_linspace_f32,
    train_sigmas,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

KOLORS = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.18.0.dev0",
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
ULP_RTOL = 3e-7  # about two float32 ulps


def reference(config: dict, steps: int):
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps)
    return ref


def ours(config: dict, steps: int) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(SchedulerConfig.from_dict(config), steps)


VARIANTS = {
    "kolors": {},
    "trailing": {"timestep_spacing": "trailing", "steps_offset": 0},
    "linspace": {"timestep_spacing": "linspace", "steps_offset": 0},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sigma_min_final": {"final_sigmas_type": "sigma_min"},
}


@pytest.mark.parametrize("steps", [1, 2, 25, 50])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_schedule_and_steps_match_diffusers(variant, steps):
    config = {**KOLORS, **VARIANTS[variant]}
    ref, sched = reference(config, steps), ours(config, steps)

    assert sched.timesteps.dtype == np.float32
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    assert sched.sigmas.dtype == np.float32 and sched.sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=ULP_RTOL, atol=0)
    np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=ULP_RTOL)

    # Each step starts both samplers from diffusers' latent, so a difference is
    # one step's own rounding, not drift carried through the loop.
    gen = torch.Generator().manual_seed(steps)
    x_ref = torch.randn(2, 4, 5, 7, generator=gen) * ref.init_noise_sigma  # [B, 4, h, w]
    for i, t in enumerate(ref.timesteps):
        x = x_ref.numpy().copy()
        tol = 1e-6 * (float(x_ref.abs().max()) + 1.0)
        scaled = sched.scale_model_input(x, i)
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled, ref.scale_model_input(x_ref, t).numpy(), rtol=1e-6, atol=tol)
        eps = torch.randn(x_ref.shape, generator=gen)
        x_ref = ref.step(eps, t, x_ref).prev_sample
        x = sched.step(eps.numpy(), i, x)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-6, atol=tol)


def test_kolors_facts():
    sched = ours(KOLORS, 50)
    assert sched.timesteps[0] == 1079 and sched.timesteps[1] == 1057 and sched.timesteps[-1] == 1
    assert np.all(np.diff(sched.timesteps) == -22)
    assert sched.sigmas[-1] == 0
    assert abs(float(sched.sigmas[0]) - 25.2814) < 1e-4
    assert abs(float(sched.init_noise_sigma) - np.sqrt(float(sched.sigmas[0]) ** 2 + 1)) < 1e-5
    assert len(sched) == 50


def test_noise_table_is_bit_exact_but_for_sqrt():
    """Betas (torch.linspace) and alphas_cumprod reproduce torch exactly."""
    ref = diffusers.EulerDiscreteScheduler.from_config(KOLORS)
    cumprod = ref.alphas_cumprod.numpy()
    expected = np.sqrt((np.float32(1) - cumprod) / cumprod)
    np.testing.assert_array_equal(train_sigmas(SchedulerConfig.from_dict(KOLORS)), expected)
    np.testing.assert_array_equal(ref.betas.numpy(), torch_linspace_f32(0.00085**0.5, 0.014**0.5, 1100) ** 2)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 999, 1000, 1100])
def test_linspace_matches_torch(n):
    for lo, hi in [(0.00085**0.5, 0.014**0.5), (0.0001, 0.02), (-1.5, 3.25)]:
        expected = torch.linspace(lo, hi, n, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(torch_linspace_f32(lo, hi, n), expected)


def test_step_is_x_plus_eps_times_dsigma():
    sched = ours(KOLORS, 50)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    eps = rng.standard_normal((1, 4, 3, 3)).astype(np.float32)
    got = sched.step(eps, 3, x)
    np.testing.assert_allclose(got, x + eps * (sched.sigmas[4] - sched.sigmas[3]), rtol=1e-5, atol=1e-5)
    assert sched.input_divisor(0) == np.float32(np.sqrt(sched.sigmas[0] ** 2 + np.float32(1)))


@pytest.mark.parametrize("steps", [0, -3, 1101, 2.5, True])
def test_bad_step_counts_raise(steps):
    with pytest.raises(SchedulerStepError, match="num_inference_steps"):
        ours(KOLORS, steps)


def test_bad_step_index_and_shape_raise():
    sched = ours(KOLORS, 4)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(SchedulerStepError, match="step_index 4"):
        sched.step(x, 4, x)
    with pytest.raises(SchedulerStepError, match="step_index -1"):
        sched.scale_model_input(x, -1)
    with pytest.raises(SchedulerStepError, match="shape"):
        sched.step(np.zeros((1, 4, 2, 3), np.float32), 0, x)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_type": "continuous"}, "timestep_type"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "_class_name"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ],
)
def test_unsupported_config_raises(override, needle):
    with pytest.raises(SchedulerConfigError, match=needle):
        SchedulerConfig.from_dict({**KOLORS, **override})


def test_trained_betas_match_diffusers():
    betas = np.linspace(0.001, 0.02, 50).tolist()
    config = {**KOLORS, "num_train_timesteps": 50, "trained_betas": betas, "steps_offset": 0}
    np.testing.assert_allclose(ours(config, 10).sigmas, reference(config, 10).sigmas.numpy(), rtol=ULP_RTOL)


def test_load_from_folder_and_errors(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(KOLORS))
    assert load_scheduler(tmp_path, 50).timesteps[0] == 1079
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SchedulerConfigError, match="bad.json"):
        load_scheduler(tmp_path / "bad.json", 50)
    with pytest.raises(SchedulerConfigError, match="missing.json"):
        load_scheduler(tmp_path / "missing.json", 50)
