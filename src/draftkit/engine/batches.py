"""Deterministic, resumable batching over an indexable dataset, sharded across data-parallel ranks."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from draftkit.errors import ConfigError


LENGTH_WINDOW = 64  # global micro-batches sorted together by group_by_length


def example_lengths(dataset: Sequence) -> list[int]:
    """Token count of every example; from a column when the dataset has one (no per-example reads, which for cached
    features would load every tensor)."""
    if hasattr(dataset, "lengths"):
        return list(dataset.lengths)
    if hasattr(dataset, "column_names"):  # a datasets.Dataset
        if "input_ids" in dataset.column_names:
            return [len(ids) for ids in dataset["input_ids"]]
    elif len(dataset) and "input_ids" in dataset[0]:
        return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    raise ConfigError("engine.group_by_length=true needs each example's token count, and this stage's examples have "
                      "no input_ids (nor does its dataset give lengths). Fix: engine.group_by_length=false")


class BatchStream:
    """Endless micro-batches: epoch e visits a permutation seeded by (seed, e); rank r of w takes its slice of
    every global micro-batch. The position is two integers, so resuming costs nothing and replays exactly."""

    def __init__(
        self,
        dataset: Sequence,
        micro_batch_size: int,
        collate: Callable[[list], dict],
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        group_by_length: bool = False,
    ):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self._lengths: list[int] | None = None
        self.global_batch = micro_batch_size * world_size
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(dataset)} examples, fewer than one global micro-batch "
                f"({micro_batch_size} per rank x {world_size} ranks). Fix: lower engine.micro_batch_size or add data"
            )
        self.epoch = 0
        self.index = 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
                self._order = torch.randperm(len(self.dataset), generator=g).tolist()
            else:
                self._order = list(range(len(self.dataset)))
            if self.group_by_length:
                self._order = self._grouped(self._order)
        return self._order

    def _grouped(self, order: list[int]) -> list[int]:
        """The epoch's order with similar lengths in each global micro-batch: windows of LENGTH_WINDOW batches are
        sorted by length (longest first), then the window's batches are shuffled, so padding shrinks while every
        example is still visited once per epoch and the order stays a function of (seed, epoch)."""
        if self._lengths is None:
            self._lengths = example_lengths(self.dataset)
        span = self.global_batch * LENGTH_WINDOW
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch + 1)
        full = len(order) - len(order) % self.global_batch  # the remainder, never visited, stays at the end
        grouped = []
        for start in range(0, full, span):
            window = sorted(order[start:min(start + span, full)], key=lambda i: -self._lengths[i])
            batches = [window[b:b + self.global_batch] for b in range(0, len(window), self.global_batch)]
            for b in torch.randperm(len(batches), generator=g).tolist():
                grouped.extend(batches[b])
        return grouped + order[full:]

    def next(self) -> dict:
        order = self._epoch_order()
        start = self.index * self.global_batch + self.rank * self.micro_batch_size
        examples = [self.dataset[i] for i in order[start : start + self.micro_batch_size]]
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return self.collate(examples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume the position; a checkpoint from a different rank count (another global micro-batch size) is
        translated by examples consumed in the epoch, which is exact when the old position divides evenly."""
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        saved_global = state.get("global_batch", self.global_batch)
        if saved_global != self.global_batch:
            self.index = self.index * saved_global // self.global_batch
            if self.index >= self.batches_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
        self._order = None
