"""Draft model builders. Each takes plain arguments (never a config object) and returns an nn.Module."""

from contextlib import contextmanager

import torch


@contextmanager
def seeded_init(seed: int):
    """Build a module's random initial weights from `seed`, leaving the global CPU generator as it was: a draft's
    initialisation then follows the run's seed, not whatever ran before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
