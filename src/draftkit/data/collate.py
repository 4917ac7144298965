"""The one padding and masking contract of draftkit: right padding, labels padded with IGNORE_INDEX."""

from __future__ import annotations

from typing import Sequence

import torch

from draftkit.objectives.ce import IGNORE_INDEX


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Examples with `input_ids` and `labels` (same length) -> LongTensors [B, T] padded on the right.

    `attention_mask` is 1 on real tokens; padded positions hold `pad_token_id` in `input_ids` and IGNORE_INDEX
    in `labels`. Use `functools.partial(collate, pad_token_id=...)` as a DataLoader's collate_fn.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = [len(example["input_ids"]) for example in examples]
    for index, (example, length) in enumerate(zip(examples, lengths)):
        if len(example["labels"]) != length:
            raise ValueError(f"example {index} has {length} input_ids but {len(example['labels'])} labels")
    shape = (len(examples), max(lengths))
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, (example, length) in enumerate(zip(examples, lengths)):
        input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.as_tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
