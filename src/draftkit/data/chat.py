"""Tokenize chat records with the target's chat template, training only on what the assistant says.

Assistant spans are found on the rendered string, never by searching for token patterns: the conversation
rendered up to the generation prompt, and rendered through the assistant message, must both be prefixes of
the full rendering; the characters between them are the assistant's. The fast tokenizer's offset mapping
turns those character spans into token labels, which works for any template that renders prefixes stably.
"""

from __future__ import annotations

import logging

import datasets
from jinja2.exceptions import TemplateError

from draftkit.data.sources import DataError
from draftkit.objectives.ce import IGNORE_INDEX

TOO_LONG_POLICIES = ("error", "truncate", "drop")

logger = logging.getLogger(__name__)


def render_chat(messages: list[dict], tokenizer, *, add_generation_prompt: bool = False) -> str:
    """The chat template applied to `messages`, as a string."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise DataError(
            f"the chat template of {_tokenizer_name(tokenizer)} cannot render this conversation: {e}"
        ) from e


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a conversation ending with a user turn, followed by the generation prompt."""
    if not messages or messages[-1]["role"] != "user":
        raise DataError("a prompt must be a conversation that ends with a user message")
    require_chat_template(tokenizer)
    # Templates write their own special tokens (BOS included); letting the tokenizer add them would double them.
    text = render_chat(messages, tokenizer, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_prompt(messages: list[dict]) -> tuple[list[dict], int] | None:
    """The conversation cut after its first user turn (system turns before it kept, earlier replies dropped) and
    that turn's index; None without a user turn. ShareGPT segments of long chats can open with an assistant turn
    that answers an unseen question, hence the drop. A user turn without text counts as none: the target would answer
    nothing in particular, and the draft would learn that."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None or not messages[first_user]["content"].strip():
        return None
    return [m for m in messages[:first_user] if m["role"] == "system"] + [messages[first_user]], first_user


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer {_tokenizer_name(tokenizer)} has no chat template, which chat data needs. Fix: use the "
            "target's instruct tokenizer, set tokenizer.chat_template, or train on plain text with pack_texts"
        )


def assistant_char_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant reply in it.

    A span starts after the generation prompt and ends after the end-of-turn token(s); whitespace the template
    writes after them is left out, since generation stops at the end-of-turn token. An assistant turn that
    opens the conversation gets no span.
    """
    full = render_chat(messages, tokenizer)
    spans = []
    for index, message in enumerate(messages):
        # An opening assistant turn (common in ShareGPT segments) answers a question the data does not show,
        # and no template renders an empty conversation: it stays as context without loss.
        if message["role"] != "assistant" or index == 0:
            continue
        before = render_chat(messages[:index], tokenizer, add_generation_prompt=True)
        through = render_chat(messages[: index + 1], tokenizer)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"the chat template of {_tokenizer_name(tokenizer)} renders conversation prefixes that are not "
                f"prefixes of the full conversation (at message {index}), so assistant tokens cannot be located. "
                "Fix: use a template that renders earlier turns the same way whatever follows them"
            )
        start = len(before)
        spans.append((start, max(start, len(through.rstrip()))))
    return full, spans


def _labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (token_start, token_end) in enumerate(offsets):
        while span_index < len(spans) and spans[span_index][1] <= token_start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        # Any overlap counts: a token that merges template text with the reply is still one the model must emit.
        if token_start < span_end and token_end > span_start:
            labels[position] = input_ids[position]
    return labels


def _with_counts(examples, truncate_to: int | None) -> dict:
    """(input_ids, labels) pairs -> the columns tokenize_chat keeps, plus the counts its length policy reads (the
    length before truncation, the loss tokens after it)."""
    out = {"input_ids": [], "labels": [], "num_tokens": [], "num_loss_tokens": []}
    for input_ids, labels in examples:
        out["num_tokens"].append(len(input_ids))
        if truncate_to is not None:
            input_ids, labels = input_ids[:truncate_to], labels[:truncate_to]
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["num_loss_tokens"].append(sum(label != IGNORE_INDEX for label in labels))
    return out


def _tokenize_conversations(batch: dict, tokenizer, truncate_to: int | None) -> dict:
    texts, spans = zip(*(assistant_char_spans(messages, tokenizer) for messages in batch["messages"]))
    encodings = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return _with_counts(((input_ids, _labels_from_spans(input_ids, offsets, conversation_spans))
                         for input_ids, offsets, conversation_spans
                         in zip(encodings["input_ids"], encodings["offset_mapping"], spans)), truncate_to)


def _measure_examples(batch: dict, truncate_to: int | None) -> dict:
    """Examples already in token ids."""
    for input_ids, labels in zip(batch["input_ids"], batch["labels"]):
        if len(labels) != len(input_ids):
            raise DataError(f"an example has {len(input_ids)} input_ids but {len(labels)} labels")
    return _with_counts(zip(batch["input_ids"], batch["labels"]), truncate_to)


def _keep_row(num_tokens: list[int], num_loss_tokens: list[int], max_length: int | None) -> list[bool]:
    return [n_loss > 0 and (max_length is None or n <= max_length) for n, n_loss in zip(num_tokens, num_loss_tokens)]


def tokenize_chat(
    dataset: datasets.Dataset, tokenizer, *, max_length: int, too_long: str = "error"
) -> datasets.Dataset:
    """`messages` records -> `input_ids` and `labels` (input ids on assistant tokens, IGNORE_INDEX elsewhere).

    `too_long` decides what happens to conversations over `max_length` tokens: "error" (the default) stops
    with a count, "truncate" cuts them, "drop" removes them. Rows left without assistant tokens are removed.
    Records that are already token ids (`input_ids` and `labels`: the `synthetic:` source) keep them, under the same
    length policy. Results are cached by the datasets fingerprint of `dataset` and the tokenizer.
    """
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
    truncate_to = max_length if too_long == "truncate" else None
    if "messages" in dataset.column_names:
        require_chat_template(tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{_tokenizer_name(tokenizer)} is not a fast tokenizer; assistant masking needs its "
                            "offset mapping. Fix: load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        tokenized = dataset.map(
            _tokenize_conversations, batched=True, remove_columns=dataset.column_names, desc="tokenizing chat",
            fn_kwargs={"tokenizer": tokenizer, "truncate_to": truncate_to},
        )
    elif {"input_ids", "labels"} <= set(dataset.column_names):
        tokenized = dataset.map(_measure_examples, batched=True, remove_columns=dataset.column_names,
                                desc="checking lengths", fn_kwargs={"truncate_to": truncate_to})
    else:
        raise DataError(
            f"tokenize_chat needs chat records (a `messages` column) or token ids (`input_ids` and `labels`), got "
            f"columns {dataset.column_names}; plain text goes through draftkit.data.packing.pack_texts"
        )
    num_tokens = tokenized["num_tokens"]
    over = sum(n > max_length for n in num_tokens)
    if over and too_long == "error":
        raise DataError(
            f"{over} of {len(tokenized)} conversations are longer than max_length={max_length} tokens "
            f"(the longest has {max(num_tokens)}). Fix: too_long='truncate' or too_long='drop', or a larger max_length"
        )
    drop_long = too_long == "drop" and over > 0
    keep = _keep_row(num_tokens, tokenized["num_loss_tokens"], max_length if drop_long else None)
    if not all(keep):
        tokenized = tokenized.filter(
            _keep_row, input_columns=["num_tokens", "num_loss_tokens"], batched=True,
            fn_kwargs={"max_length": max_length if drop_long else None}, desc="dropping rows",
        )
        logger.info("tokenize_chat kept %d of %d conversations: %d are over max_length=%d (too_long=%r), and rows "
                    "without assistant tokens are dropped", len(tokenized), len(keep), over, max_length, too_long)
    if len(tokenized) == 0:
        raise DataError(
            "no conversation has assistant tokens to train on. Prompt-only records need responses first: "
            "draftkit.data.selfdistill.regenerate_responses answers them with the target"
        )
    return tokenized.remove_columns(["num_tokens", "num_loss_tokens"])


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
