"""The initial latent noise of diffusers' Kolors pipeline, in numpy, bit for bit.

diffusers draws it with ``randn_tensor(shape, generator=torch.Generator().manual_seed(seed))``
on the CPU in float32, which is ``torch.randn``. For a contiguous float32
tensor of 16 or more elements torch's CPU kernel (``normal_fill`` in ATen's
``DistributionTemplates.h``, AVX2 variant) does:

1. seed ``at::mt19937`` with the low 32 bits of the seed (the reference
   MT19937 with Knuth's initialisation, as numpy's MT19937 state);
2. draw one uniform per element, ``(uint32 & 0xFFFFFF) * 2**-24``;
3. Box-Muller over each block of 16 as 8 pairs (j, j + 8), with
   ``log256_ps`` / ``sincos256_ps`` from ATen's ``avx_mathfun.h`` (Cephes
   float32 polynomials, not libm) compiled with fused multiply-adds;
4. if the size is not a multiple of 16, redraw 16 uniforms for the last 16
   elements and transform them again.

The polynomials below follow the compiled instruction sequence, fused
multiply-adds included (``_fma``); tests/test_runtime_noise.py checks the
result bit for bit against ``torch.randn``. So the ONNX Runtime path needs no
torch and a seed gives the image diffusers gives.

This is the noise of torch on x86-64 CPUs with AVX2 or AVX-512 (the AVX2 kernel
serves both), where diffusers' reference images are made. On hosts where torch
runs another kernel (aarch64 servers, x86 CPUs without AVX2) torch's own noise
differs from it in the last bits, so there a seed reproduces this runtime's image
on every host, not torch's noise on that host; the test is skipped there.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

F32, F64, U32 = np.float32, np.float64, np.uint32
MIN_ELEMENTS = 16  # below this torch uses another (scalar) algorithm; latents are never that small
_MT_N = 624


class NoiseError(InputError):
    """A seed or a noise shape outside what torch's CPU generator path covers."""


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add: a*b + c rounded once.

    A product of two float32 is exact in float64; the float64 sum is made
    round-to-odd (TwoSum error, then a nudge), so rounding it to float32 is the
    correctly rounded fused result (53 >= 24 + 2 bits)."""
    p = np.asarray(a, F64) * np.asarray(b, F64)
    c = np.asarray(c, F64)
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))  # s + err == p + c exactly
    nudge = (err != 0) & ((s.view(np.uint64) & np.uint64(1)) == 0)
    s = np.where(nudge, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def _mul(a, b) -> np.ndarray:
    return (np.asarray(a, F32) * np.asarray(b, F32)).astype(F32)


def _log(x: np.ndarray) -> np.ndarray:
    """avx_mathfun log256_ps (natural log, Cephes), as compiled."""
    x = np.maximum(x, np.array(0x00800000, U32).view(F32))  # smallest normal
    bits = x.view(U32)
    e = ((bits >> U32(23)).astype(np.int32) - 0x7F).astype(F32) + F32(1)
    x = ((bits & U32(0x807FFFFF)) | np.array(0.5, F32).view(U32)).view(F32)  # mantissa in [0.5, 1)
    small = x < F32(0.707106781186547524)
    tmp = np.where(small, x, F32(0))
    x = x - F32(1)
    e = np.where(small, e - F32(1), e)
    x = x + tmp
    z = _mul(x, x)
    y = np.full_like(x, F32(7.0376836292e-2))
    for coef in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                 -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma(y, x, F32(coef))
    y = _mul(y, x)
    y = _fma(y, z, _mul(e, F32(-2.12194440e-4)))
    y = _fma(z, F32(-0.5), y)
    return _fma(e, F32(0.693359375), x + y)


def _sincos(theta: np.ndarray) -> tuple:
    """avx_mathfun sincos256_ps (Cephes), as compiled; returns (sin, cos)."""
    bits = theta.view(U32)
    sign_sin = bits & U32(0x80000000)
    x = (bits & U32(0x7FFFFFFF)).view(F32)
    j = _mul(x, F32(1.27323954473516)).astype(np.int32)  # x * 4/pi, truncated
    j = (j + 1) & ~1
    yq = j.astype(F32)
    sign_sin = sign_sin ^ ((j & 4).astype(U32) << U32(29))
    sign_cos = ((~(j - 2)) & 4).astype(U32) << U32(29)
    use_sin_poly = (j & 2) == 0
    for part in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):  # extended-precision x - yq*pi/4
        x = _fma(yq, F32(part), x)
    z = _mul(x, x)
    yc = _fma(F32(2.443315711809948e-5), z, F32(-1.388731625493765e-3))
    yc = _fma(yc, z, F32(4.166664568298827e-2))
    yc = _fma(_mul(yc, z), z, -_mul(z, F32(0.5))) + F32(1)
    ys = _fma(F32(-1.9515295891e-4), z, F32(8.3321608736e-3))
    ys = _fma(ys, z, F32(-1.6666654611e-1))
    ys = _fma(_mul(ys, z), x, x)
    sin = np.where(use_sin_poly, ys, yc).view(U32) ^ sign_sin
    cos = np.where(use_sin_poly, yc, ys).view(U32) ^ sign_cos
    return sin.view(F32), cos.view(F32)


def _box_muller(uniform: np.ndarray) -> np.ndarray:
    """normal_fill_16 over consecutive blocks of 16 uniforms."""
    block = uniform.reshape(-1, 2, 8)
    radius = np.sqrt(_mul(F32(-2), _log(F32(1) - block[:, 0])))
    sin, cos = _sincos(_mul(F32(2 * np.pi), block[:, 1]))
    return np.stack([_mul(radius, cos), _mul(radius, sin)], axis=1).reshape(-1)


def _mt19937_uint32(seed: int, count: int) -> np.ndarray:
    """``count`` outputs of torch's at::mt19937 seeded with ``seed`` (low 32 bits)."""
    key = np.empty(_MT_N, dtype=np.uint64)
    key[0] = seed & 0xFFFFFFFF
    for i in range(1, _MT_N):  # Knuth's initialisation, as at::mt19937 and mt19937ar.c
        prev = int(key[i - 1])
        key[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": key.astype(U32), "pos": _MT_N}}
    return bits.random_raw(count).astype(U32)


def _check(shape: tuple, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise NoiseError(f"noise: seed must be an int in [0, 2**64), found {seed!r}")
    n = int(np.prod(shape))
    if n < MIN_ELEMENTS:
        raise NoiseError(f"noise: shape {tuple(shape)} has {n} elements; torch's vectorised path needs >= {MIN_ELEMENTS}")
    return n


def _normal(raw: np.ndarray, n: int) -> np.ndarray:
    """One ``normal_fill`` over the uint32 draws of one call: ``n`` (+ 16 when n % 16) values."""
    tail = n % 16
    uniform = (raw & U32(0xFFFFFF)).astype(F32) * F32(2.0**-24)
    out = uniform[:n].copy()
    out[: n - tail] = _box_muller(out[: n - tail])
    if tail:
        out[n - 16 :] = _box_muller(uniform[n:])
    return out


def torch_randn(shape: tuple, seed: int) -> np.ndarray:
    """``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on the CPU, float32."""
    return torch_randn_draws(shape, seed, 1)[0]


def torch_randn_draws(shape: tuple, seed: int, draws: int) -> np.ndarray:
    """``draws`` successive ``torch.randn(shape, generator=g)`` of one generator ``g`` seeded with ``seed``,
    float32 [draws, *shape]: how diffusers draws the initial latents and then an ancestral sampler's noise of
    each step from the request's generator. Each call takes n (+ 16 when n % 16) outputs of the MT19937
    stream, so draw k starts where draw k - 1 ended."""
    n = _check(shape, seed)
    per_draw = n + (16 if n % 16 else 0)
    raw = _mt19937_uint32(int(seed), per_draw * draws).reshape(draws, per_draw)
    return np.stack([_normal(r, n) for r in raw]).reshape((draws, *shape))


def request_noise(shape: tuple, seed, latents, steps: int, stochastic: bool):
    """(initial latents [n, C, h, w], the sampler's noise of every step [steps, n, C, h, w] or None) of one
    request as diffusers draws them from its generator: the initial latents (unless given), then one draw per
    step for a stochastic sampler."""
    if not stochastic:
        return (torch_randn(shape, seed) if latents is None else latents), None
    drawn = torch_randn_draws(shape, seed, steps + (latents is None))
    return (drawn[0] if latents is None else latents), drawn[len(drawn) - steps:]


__all__ = ["NoiseError", "request_noise", "torch_randn", "torch_randn_draws"]
