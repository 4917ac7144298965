"""Pack plain text into fixed-length blocks for draft pretraining."""

from __future__ import annotations

from itertools import chain

import datasets

from draftkit.data.sources import DataError


def _pack_batch(batch: dict, tokenizer, seq_len: int, eos_token_id: int) -> dict:
    documents = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
    stream = list(chain.from_iterable(document + [eos_token_id] for document in documents))
    blocks = [stream[start : start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def pack_texts(
    dataset: datasets.Dataset, tokenizer, *, seq_len: int, eos_token_id: int | None = None
) -> datasets.Dataset:
    """`text` records -> blocks of exactly `seq_len` tokens (`input_ids`, `labels` = input_ids).

    Documents are concatenated with `eos_token_id` (default: the tokenizer's EOS) after each one, so blocks
    have no padding. Each map batch of 1000 documents drops its last partial block (under seq_len tokens).
    """
    if "text" not in dataset.column_names:
        raise DataError(
            f"pack_texts needs plain-text records (a `text` column), got columns {dataset.column_names}; "
            "chat records go through draftkit.data.chat.tokenize_chat"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents; pass eos_token_id")
    packed = dataset.map(
        _pack_batch, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc="packing text",
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "eos_token_id": eos_token_id},
    )
    if len(packed) == 0:
        raise DataError(f"the text holds fewer than seq_len={seq_len} tokens, so no block can be made; "
                        "add text or lower seq_len")
    return packed
