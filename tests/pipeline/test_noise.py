"""The noise key is pinned: every (seed, epoch, chunk, step) draws its own noise, and known keys draw
known values. The reference loop shares these functions with the engine, so only fixed values catch a
change in them (a key without the step, say, would pass every comparison with the reference)."""

import itertools

import pytest
import torch

from pipeline.sampling import chunk_noise, noise_seed


def test_every_distinct_key_has_its_own_seed():
    seeds, epochs, chunks, steps = (0, 1, 12, 2**62), (0, 1, 2, 23), (0, 1, 3, 123), (0, 1, 2, 3, 4)
    keys = list(itertools.product(seeds, epochs, chunks, steps))
    assert len({noise_seed(*k) for k in keys}) == len(keys)
    # fields do not run into each other: (1, 23) and (12, 3) are different keys
    assert noise_seed(1, 23, 0, 0) != noise_seed(12, 3, 0, 0)
    assert noise_seed(0, 1, 23, 0) != noise_seed(0, 12, 3, 0)
    assert all(0 <= noise_seed(*k) < 2**63 for k in keys)


def test_known_keys_draw_known_values():
    assert noise_seed(0, 0, 0, 0) == 2485315603693661936
    assert noise_seed(7, 1, 3, 2) == 1388329563729885845
    assert noise_seed(2**62, 2, 100, 4) == 3842090088835259371
    got = chunk_noise(7, 1, 3, 2, (4,), torch.float64, "cpu").tolist()
    assert got == pytest.approx([0.05280479043722153, 0.47562703490257263, -0.22627298533916473, -1.2870969772338867])
    got = chunk_noise(0, 0, 0, 0, (3,), torch.float64, "cpu").tolist()
    assert got == pytest.approx([-0.09102962166070938, -0.12078334391117096, -0.7659252882003784])


def test_noise_does_not_depend_on_dtype_or_shape_of_the_batch():
    a = chunk_noise(5, 0, 9, 1, (2, 3), torch.float32, "cpu")
    b = chunk_noise(5, 0, 9, 1, (2, 3), torch.float64, "cpu")
    assert torch.equal(a.double(), b)
    assert not torch.equal(a, chunk_noise(5, 0, 9, 2, (2, 3), torch.float32, "cpu"))
