"""qt.seeding, the one way qt names random streams: the streams that existed before it (the
sampler's batches, the locomotion generator's episode seeds) are unchanged, and neighbouring
names give unrelated streams."""

from __future__ import annotations

import numpy as np

from qt.data.sampler import batch_rng
from qt.datagen.locomotion import _STREAMS, episode_seed
from qt.seeding import derived_seed, seed_sequence


def test_the_sampler_draws_the_batches_it_drew_before():
    # the generator of batch 5 of rank 1 in a run seeded 123, as the sampler built it by hand
    before = np.random.default_rng(np.random.SeedSequence([123, 1, 5]))
    assert np.array_equal(
        batch_rng(123, 1, 5).integers(0, 2**31, 16), before.integers(0, 2**31, 16)
    )


def test_the_generator_seeds_its_episodes_as_before():
    stream = next(iter(_STREAMS))
    by_hand = int(np.random.SeedSequence([7, _STREAMS[stream], 11]).generate_state(1)[0])
    assert episode_seed(7, stream, 11) == by_hand


def test_neighbouring_names_give_different_streams():
    seeds = {derived_seed(0, step, k) for step in range(200) for k in range(3)}
    assert len(seeds) == 600
    assert derived_seed(1, 2) != derived_seed(2, 1)
    assert 0 <= derived_seed(5, 9) < 2**32


def test_negative_parts_wrap_instead_of_failing():
    assert seed_sequence(-1).entropy == seed_sequence(2**63 - 1).entropy
