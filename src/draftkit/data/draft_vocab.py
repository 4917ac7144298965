"""Token counts for choosing a draft vocabulary (drafts/vocab.py): how often each target id is a training label.

The labels are the tokens the draft must predict (the target's own replies when they are self-distilled), so their
frequencies are the ones the kept set should cover; prompt and padding positions hold IGNORE_INDEX and are not counted.
"""

from __future__ import annotations

from typing import Iterable

import torch

from draftkit.objectives.ce import IGNORE_INDEX


def label_counts(examples: Iterable[dict], vocab_size: int) -> torch.Tensor:
    """[V] int64: how often each id appears among the examples' scored `labels`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for example in examples:
        labels = torch.as_tensor(example["labels"], dtype=torch.long)
        labels = labels[labels != IGNORE_INDEX]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab_size):
            raise ValueError(f"a label id lies outside the target's vocabulary of {vocab_size}: the chats were "
                             "tokenized for another model")
        counts += torch.bincount(labels, minlength=vocab_size)
    return counts
