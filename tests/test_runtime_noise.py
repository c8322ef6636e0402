"""runtime/noise.py: torch.randn of a seeded CPU generator, bit for bit, without torch."""

import numpy as np
import pytest

from kolors_trt.runtime.noise import NoiseError, torch_randn, torch_randn_draws

torch = pytest.importorskip("torch")

# torch's CPU randn matches the numpy kernel where torch runs its AVX2 kernel (AVX2 and AVX-512 hosts);
# aarch64 and pre-AVX2 hosts run another one (runtime/noise.py).
VECTORISED = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize(
    "seed, shape",
    [(0, (1, 4, 8, 8)), (42, (2, 4, 12, 8)), (7, (1, 4, 128, 128)), (3, (40,)), (5, (1000,)), (2**40 + 3, (1, 4, 8, 8)),
     (2**64 - 1, (17,)), (123, (4, 4, 96, 64))],
)
@pytest.mark.skipif(not VECTORISED, reason=f"torch runs its {torch.backends.cpu.get_cpu_capability()} randn kernel "
                    "here, not the AVX2 one that runtime/noise.py reproduces")
def test_bit_exact_with_torch(seed, shape):
    want = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
    got = torch_randn(shape, seed)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("seed, shape", [(0, (1, 4, 8, 12)), (2**40 + 3, (2, 4, 12, 8)), (9, (3, 7))])
@pytest.mark.skipif(not VECTORISED, reason="torch runs another randn kernel here (see above)")
def test_draws_continue_one_generator(seed, shape):
    """Successive torch.randn calls on one generator (diffusers: the initial latents, then euler_a's noise of
    each step), including a size that is no multiple of 16 (torch redraws its last 16 values)."""
    generator = torch.Generator().manual_seed(seed)
    want = np.stack([torch.randn(shape, generator=generator).numpy() for _ in range(5)])
    got = torch_randn_draws(shape, seed, 5)
    assert got.shape == (5, *shape)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(got[0], torch_randn(shape, seed))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_bad_seed(seed):
    with pytest.raises(NoiseError, match="seed"):
        torch_randn((1, 4, 8, 8), seed)


def test_too_small():
    with pytest.raises(NoiseError, match="elements"):
        torch_randn((3, 5), 0)
