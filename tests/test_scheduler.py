"""The samplers' tables and step function (runtime/samplers.py, runtime/scheduler.py) against diffusers'
schedulers, built as a diffusers user builds them: ``Class.from_config(EulerDiscreteScheduler config,
**overrides)``.

Timesteps match exactly and sigmas to one float32 ulp: this CPU torch build's float32 sqrt is not
correctly rounded (it differs from IEEE sqrt by one ulp on roughly a sixth of inputs), and the runtime uses
IEEE sqrt. Whole sampling loops (a model output that depends on the latents, so errors would grow) match
diffusers' ``step`` within 2e-5 of the latents' max; euler_a draws its noise from the seed's generator.
Euler's step is diffusers' float32 operations in diffusers' order, bit for bit.
"""

import inspect
import json

import numpy as np
import pytest

from kolors_trt.runtime.noise import torch_randn_draws
from kolors_trt.runtime.samplers import (
    SAMPLERS,
    SamplerError,
    Samplers,
    sampler_step,
    sampler_tables,
)
from kolors_trt.runtime.scheduler import (
    CLASS_DEFAULTS,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerStepError,
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

# folder config variants every sampler honours
VARIANTS = {
    "kolors": {},
    "trailing": {"timestep_spacing": "trailing", "steps_offset": 0},
    "linspace": {"timestep_spacing": "linspace", "steps_offset": 0},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000},
    "v_prediction": {"prediction_type": "v_prediction"},
}
# settings only some classes read: each sampler ignores the keys its class does not know
EXTRA = {
    "euler": [{"final_sigmas_type": "sigma_min"}, {"prediction_type": "sample"}],
    "euler_a": [{"final_sigmas_type": "sigma_min", "solver_order": 3}],
    "dpmpp_2m": [{"solver_type": "heun"}, {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
                 {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, {"lambda_min_clipped": -5.1},
                 {"prediction_type": "sample"}],
    "dpmpp_2m_karras": [{"sigma_min": 0.1, "sigma_max": 10.0}, {"final_sigmas_type": "sigma_min"}],
    "unipc": [{"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {"solver_order": 3}, {"solver_order": 1}, {"disable_corrector": [1, 3]},
              {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, {"prediction_type": "sample"},
              {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}],
}
CASES = [(name, variant, VARIANTS[variant]) for name in SAMPLERS for variant in VARIANTS] + [
    (name, json.dumps(extra, sort_keys=True), extra) for name, extras in EXTRA.items() for extra in extras]


def reference(name: str, config: dict, steps: int):
    """diffusers' scheduler of sampler ``name``, built the way a user swaps the pipeline's scheduler."""
    class_name, overrides = SAMPLERS[name]
    base = diffusers.EulerDiscreteScheduler.from_config(config)
    ref = getattr(diffusers, class_name).from_config(base.config, **overrides)
    ref.set_timesteps(steps)
    return ref


def fake_model(x: np.ndarray, t: float, xp):
    """A model output that depends on the (scaled) latents, so a wrong step shows and errors would grow."""
    return 0.3 * xp.sin(x) + 0.5 * x * (t / 1000.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 25])
@pytest.mark.parametrize("name, variant, override", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sampling_loop_matches_diffusers(name, variant, override, steps):
    config = {**KOLORS, **override}
    ref = reference(name, config, steps)
    ours = sampler_tables(SchedulerConfig.from_dict(config), name, steps)
    assert ours.timesteps.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=ULP_RTOL, atol=0)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=ULP_RTOL)

    seed = steps + 7
    x_ref = torch.randn((2, 4, 5, 7), generator=torch.Generator().manual_seed(seed)) * ref.init_noise_sigma
    x = x_ref.numpy().copy()
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch_randn_draws(x.shape, seed + 1, steps) if ours.stochastic else None
    previous, base = [np.zeros_like(x)] * max(ours.history - 1, 0), x
    for i, t in enumerate(ref.timesteps):
        m_ref = fake_model(ref.scale_model_input(x_ref, t), float(t), torch)
        x_ref = ref.step(m_ref, t, x_ref, **({"generator": generator} if ours.stochastic else {})).prev_sample
        m = fake_model(x / ours.divisor[i], float(ours.timesteps[i]), np).astype(np.float32)
        x, y, base = sampler_step(ours.at(i), x, m, previous, base, None if noise is None else noise[i])
        previous = [y, *previous][: len(previous)]
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=2e-5 * float(x_ref.abs().max()),
                                   err_msg=f"step {i}")


def test_euler_step_is_diffusers_float32_operations_bit_for_bit():
    """sample - sigma * eps, / sigma, * (sigma_next - sigma), + sample: diffusers' operations and order."""
    ours = sampler_tables(SchedulerConfig.from_dict(KOLORS), "euler", 50)
    rng = np.random.default_rng(0)
    for i in (0, 17, 49):
        x = (rng.standard_normal((2, 4, 6, 5)) * 14).astype(np.float32)
        eps = rng.standard_normal((2, 4, 6, 5)).astype(np.float32)
        sigma, sigma_next = ours.sigmas[i], ours.sigmas[i + 1]
        want = x + ((x - (x - sigma * eps)) / sigma) * np.float32(sigma_next - sigma)
        got, _, _ = sampler_step(ours.at(i), x, eps, [], x)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
        np.testing.assert_array_equal(x / ours.divisor[i], x / np.float32(np.sqrt(sigma * sigma + np.float32(1))))


def test_class_defaults_are_diffusers_constructor_defaults():
    for class_name, defaults in CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert set(defaults) == set(params) - {"self"}, class_name
        for key, value in defaults.items():
            assert params[key].default == value, f"{class_name}.{key}"


def test_kolors_facts():
    euler = sampler_tables(SchedulerConfig.from_dict(KOLORS), "euler", 50)
    assert euler.timesteps[0] == 1079 and euler.timesteps[-1] == 1 and np.all(np.diff(euler.timesteps) == -22)
    assert euler.sigmas[-1] == 0 and abs(float(euler.sigmas[0]) - 25.2814) < 1e-4
    assert abs(float(euler.init_noise_sigma) - np.sqrt(float(euler.sigmas[0]) ** 2 + 1)) < 1e-5
    assert (euler.history, euler.stochastic) == (0, False)
    karras = sampler_tables(SchedulerConfig.from_dict(KOLORS), "dpmpp_2m_karras", 25)
    assert karras.init_noise_sigma == 1 and np.all(karras.divisor == 1) and karras.history == 2
    unipc = sampler_tables(SchedulerConfig.from_dict(KOLORS), "unipc", 20)
    assert unipc.history == 3 and unipc.f is not None and not unipc.stochastic
    assert sampler_tables(SchedulerConfig.from_dict(KOLORS), "euler_a", 20).stochastic


def test_noise_table_is_bit_exact_but_for_sqrt():
    """Betas (torch.linspace) and alphas_cumprod reproduce torch exactly."""
    ref = diffusers.EulerDiscreteScheduler.from_config(KOLORS)
    cumprod = ref.alphas_cumprod.numpy()
    expected = np.sqrt((np.float32(1) - cumprod) / cumprod)
    settings = SchedulerConfig.from_dict(KOLORS).settings("EulerDiscreteScheduler", {})
    np.testing.assert_array_equal(train_sigmas(settings), expected)
    np.testing.assert_array_equal(ref.betas.numpy(), torch_linspace_f32(0.00085**0.5, 0.014**0.5, 1100) ** 2)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 999, 1000, 1100])
def test_linspace_matches_torch(n):
    for lo, hi in [(0.00085**0.5, 0.014**0.5), (0.0001, 0.02), (-1.5, 3.25)]:
        expected = torch.linspace(lo, hi, n, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(torch_linspace_f32(lo, hi, n), expected)


def test_trained_betas_match_diffusers():
    betas = np.linspace(0.001, 0.02, 50).tolist()
    config = {**KOLORS, "num_train_timesteps": 50, "trained_betas": betas, "steps_offset": 0}
    for name in SAMPLERS:
        ours = sampler_tables(SchedulerConfig.from_dict(config), name, 10)
        np.testing.assert_allclose(ours.sigmas, reference(name, config, 10).sigmas.numpy(), rtol=ULP_RTOL)


def test_defaults_used_keys_are_not_the_files():
    """A config saved by diffusers lists the keys it filled with defaults (``_use_default_values``); from_config
    leaves them out, so another class uses its own default (here UniPC's sigma_min for its Karras schedule)."""
    config = {**KOLORS, "use_karras_sigmas": False, "sigma_min": 5.0, "_use_default_values": ["sigma_min"]}
    ours = sampler_tables(SchedulerConfig.from_dict(config), "dpmpp_2m_karras", 8)
    np.testing.assert_allclose(ours.sigmas, reference("dpmpp_2m_karras", config, 8).sigmas.numpy(), rtol=ULP_RTOL)
    assert ours.sigmas[-2] < 1


@pytest.mark.parametrize("steps", [0, -3, 1101, 2.5, True])
def test_bad_step_counts_raise(steps):
    with pytest.raises(SchedulerStepError, match="num_inference_steps"):
        sampler_tables(SchedulerConfig.from_dict(KOLORS), "unipc", steps)


def test_unknown_sampler_lists_the_names():
    with pytest.raises(SamplerError, match="'ddim' is not one of the samplers: euler, euler_a, dpmpp_2m, "
                                           "dpmpp_2m_karras, unipc"):
        Samplers(SchedulerConfig.from_dict(KOLORS)).tables("ddim", 4)


@pytest.mark.parametrize(
    "override, names, needle",
    [
        ({"use_karras_sigmas": True}, ["euler"], "use_karras_sigmas"),
        ({"use_exponential_sigmas": True}, ["euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc"], "use_exponential_sigmas"),
        ({"rescale_betas_zero_snr": True}, list(SAMPLERS), "rescale_betas_zero_snr"),
        ({"timestep_spacing": "karras"}, list(SAMPLERS), "timestep_spacing"),
        ({"beta_schedule": "squaredcos_cap_v2"}, list(SAMPLERS), "beta_schedule"),
        ({"interpolation_type": "log_linear"}, ["euler"], "interpolation_type"),
        ({"prediction_type": "flow_prediction"}, list(SAMPLERS), "prediction_type"),
        ({"prediction_type": "sample"}, ["euler_a"], "prediction_type"),
        ({"thresholding": True}, ["dpmpp_2m", "dpmpp_2m_karras", "unipc"], "thresholding"),
        ({"trained_betas": [0.1, 0.2]}, list(SAMPLERS), "trained_betas"),
        ({"num_train_timesteps": 1.5}, list(SAMPLERS), "num_train_timesteps"),
    ],
)
def test_unsupported_settings_raise_for_the_samplers_that_read_them(override, names, needle):
    samplers = Samplers(SchedulerConfig.from_dict({**KOLORS, **override}))
    for name in SAMPLERS:
        if name in names:
            with pytest.raises(SchedulerConfigError, match=needle):
                samplers.tables(name, 4)
        else:
            samplers.tables(name, 4)  # a key its class does not know is ignored, as by from_config
    assert samplers.names == tuple(n for n in SAMPLERS if n not in names)


@pytest.mark.parametrize("override", [{"predict_x0": False}, {"lower_order_final": False}, {"solver_type": "bh1"}])
def test_settings_where_diffusers_gives_nan_raise(override):
    """UniPC at a zero final sigma: noise prediction, second order at the last step, or B(h) = h (infinite there)
    give NaN latents in diffusers too; the runtime refuses rather than sampling NaN."""
    ref = reference("unipc", {**KOLORS, **override}, 8)
    x = torch.randn(1, 4, 4, 4)
    for t in ref.timesteps:
        x = ref.step(0.3 * torch.sin(x), t, x).prev_sample
    assert not torch.isfinite(x).all()
    with pytest.raises(SchedulerConfigError, match="non-finite"):
        sampler_tables(SchedulerConfig.from_dict({**KOLORS, **override}), "unipc", 8)


def test_tables_are_cached_and_read_only(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(KOLORS))
    samplers = Samplers(SchedulerConfig.from_file(tmp_path))
    first = samplers.tables("dpmpp_2m_karras", 25)
    assert samplers.tables("dpmpp_2m_karras", 25) is first
    with pytest.raises(ValueError):
        first.b[0, 0] = 1.0
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SchedulerConfigError, match="bad.json"):
        SchedulerConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(SchedulerConfigError, match="missing.json"):
        SchedulerConfig.from_file(tmp_path / "missing.json")
