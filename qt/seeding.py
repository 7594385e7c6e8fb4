"""The one way qt derives independent random streams from integers: numpy's `SeedSequence`.

A stream is named by integers (a run's seed, a rank, a batch or step number, a stream id);
`SeedSequence` hashes them, so neighbouring names ((seed, 7) and (seed, 8), or (1, 2) and
(2, 1)) give unrelated streams, and a stream depends on its name only: a resumed run, another
number of DataLoader workers or another batching of episodes draws the same numbers.
"""

from __future__ import annotations

import numpy as np


def seed_sequence(*parts: int) -> np.random.SeedSequence:
    """The SeedSequence of the stream named `parts` (whole numbers; negatives wrap)."""
    return np.random.SeedSequence([int(p) % 2**63 for p in parts])


def derived_seed(*parts: int) -> int:
    """A 32-bit seed of the stream named `parts`, for what takes an integer seed (torch
    generators, environments' `reset(seed=...)`)."""
    return int(seed_sequence(*parts).generate_state(1)[0])


__all__ = ["derived_seed", "seed_sequence"]
