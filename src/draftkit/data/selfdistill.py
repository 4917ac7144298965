"""Self-distillation data: the frozen target answers the prompts, and a draft then learns from its answers.

Drafts trained on the target's own outputs match its distribution better than drafts trained on dataset answers
(Medusa-2's self-distillation, FastDraft's fine-tuning stage). Generation is slow, so every finished batch is appended
to a JSON Lines cache and a rerun only generates what the cache lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterable

import datasets
import torch
from tqdm.auto import tqdm

from draftkit.data.chat import first_prompt, prompt_ids, render_chat
from draftkit.data.sources import DataError, load_records


def prompts_from_records(
    records: datasets.Dataset | Iterable[dict], max_prompt_tokens: int | None = None, tokenizer=None
) -> list[list[dict]]:
    """Each chat record cut after its first user turn (system turns before it kept, earlier replies dropped).

    Records without a user turn with text are skipped; with `max_prompt_tokens`, so are prompts longer than that once
    rendered with `tokenizer`'s chat template.
    """
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs the tokenizer that renders the prompts")
    if isinstance(records, datasets.Dataset) and "messages" not in records.column_names:
        hint = ("; examples already in token ids (synthetic:) have no prompts to answer: train on them as they are "
                "with the recipe's labels=data" if "input_ids" in records.column_names else "")
        raise DataError(f"prompts come from chat records (a `messages` column), got columns {records.column_names}"
                        + hint)
    prompts = []
    for record in records:
        found = first_prompt(record["messages"])
        if found is None:
            continue
        prompt = found[0]
        if max_prompt_tokens is None or len(prompt_ids(prompt, tokenizer)) <= max_prompt_tokens:
            prompts.append(prompt)
    return prompts


def check_prompt_sources(name: str, sources: list[str], limit: int | None) -> None:
    """Before any model is loaded: the local and builtin sources of the setting `name` hold chat records, and at least
    one has a user turn with text (hf: sources are read later, when they are loaded; synthetic: ones hold no prompts,
    only training examples for <recipe>.labels=data)."""
    from draftkit.data.sources import load_records

    local = [s for s in sources if not s.startswith(("hf:", "synthetic:"))]
    if not local:
        return
    usable, read = 0, 0
    for source in local:
        records = load_records(source, limit=limit)
        if "messages" not in records.column_names:
            raise DataError(f"{name}: {source} holds plain text, but prompts come from chat records. Fix: give "
                            "chat records ({messages}, {conversations}, {prompt, response}, {question, answer} or "
                            "{turns}), or put plain text in data.pretrain")
        read += len(records)
        usable += sum(first_prompt(messages) is not None for messages in records["messages"])
    if usable == 0 and len(local) == len(sources):
        raise DataError(f"{name}: none of the {read} records in {local} has a user turn with text, so there is "
                        "nothing to prompt the target with. Fix: give prompts with text in their user turn")


def _cache_key(rendered_prompt: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps([rendered_prompt, settings], sort_keys=True).encode()).hexdigest()


def _read_cache(cache_file: Path) -> dict[str, str]:
    """Cached replies by key. Text after the last newline is a line cut by a kill mid-write: it is removed."""
    if not cache_file.exists():
        return {}
    data = cache_file.read_bytes()
    complete, _, cut_line = data.rpartition(b"\n")
    responses = {}
    for line_number, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            responses[entry["key"]] = entry["response"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{cache_file}:{line_number}: corrupt self-distillation cache line ({e}); "
                            "delete the file to generate every reply again") from None
    if cut_line:
        with open(cache_file, "r+b") as f:
            f.truncate(len(data) - len(cut_line))
    return responses


def _stop_token_ids(model, tokenizer) -> set[int]:
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return {token for token in [*configured, tokenizer.eos_token_id] if token is not None}


def _left_padded(batch_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generate_batch(model, tokenizer, batch_ids: list[list[int]], stop_ids: set[int], settings: dict) -> list[str]:
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    input_ids, attention_mask = _left_padded(batch_ids, pad_token_id, next(model.parameters()).device)
    sampling = settings["temperature"] > 0
    # Every sampling knob is set explicitly so the model's shipped generation_config (top_k, repetition
    # penalty, ...) cannot skew the distribution the draft learns.
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings["max_new_tokens"],
        do_sample=sampling, temperature=settings["temperature"] if sampling else 1.0,
        top_p=settings["top_p"] if sampling else 1.0, top_k=0 if sampling else None, repetition_penalty=1.0,
        eos_token_id=sorted(stop_ids), pad_token_id=pad_token_id, use_cache=True,
    )
    responses = []
    for row in output[:, input_ids.shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        responses.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return responses


def regenerate_responses(
    model,
    tokenizer,
    conversations: Iterable[list[dict]],
    *,
    cache_file: str | os.PathLike,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[list[dict]]:
    """Each conversation (ending with a user turn) plus an assistant turn holding the target's reply.

    Greedy when `temperature` is 0. Replies are cached in `cache_file` under a hash of the rendered prompt and
    the settings, so an interrupted run resumes where it stopped. Keep one cache file per target model.
    """
    conversations = [list(conversation) for conversation in conversations]
    settings = {"max_new_tokens": max_new_tokens, "temperature": float(temperature)}
    if temperature > 0:  # greedy replies do not depend on these, so they must not split the cache
        settings.update(top_p=float(top_p), seed=seed)
    keys = [_cache_key(render_chat(c, tokenizer, add_generation_prompt=True), settings) for c in conversations]
    cache_file = Path(cache_file)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    responses = _read_cache(cache_file)
    pending = {key: conversation for key, conversation in zip(keys, conversations) if key not in responses}
    pending_ids = {key: prompt_ids(conversation, tokenizer) for key, conversation in pending.items()}
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    work = sorted(pending_ids, key=lambda key: len(pending_ids[key]), reverse=True)
    stop_ids = _stop_token_ids(model, tokenizer)
    devices = [next(model.parameters()).device] if next(model.parameters()).is_cuda else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), \
            open(cache_file, "a", encoding="utf-8") as cache, \
            tqdm(total=len(work), desc="target answers", unit="prompt", disable=not progress) as bar:
        torch.manual_seed(seed)
        for start in range(0, len(work), batch_size):
            batch_keys = work[start : start + batch_size]
            replies = _generate_batch(model, tokenizer, [pending_ids[k] for k in batch_keys], stop_ids, settings)
            for key, reply in zip(batch_keys, replies):
                cache.write(json.dumps({"key": key, "response": reply}, ensure_ascii=False) + "\n")
                responses[key] = reply
            cache.flush()
            os.fsync(cache.fileno())
            bar.update(len(batch_keys))
    return [conversation + [{"role": "assistant", "content": responses[key]}]
            for conversation, key in zip(conversations, keys)]


def _question(prompt: list[dict]) -> str:
    """A prompt's user turn with its whitespace normalised: what two copies of one question share."""
    return " ".join(prompt[-1]["content"].split())


def distinct_training_prompts(prompts: list[list[dict]], heldout: Iterable[list[dict]] = ()) -> list[list[dict]]:
    """`prompts` without repeats (the first copy of each prompt stays: greedy answers to copies are copies, which only
    weight that prompt more) and without the questions of `heldout` (the evaluation prompts: a draft must never train
    on what it is measured on). Says what it left out."""
    banned = {_question(p) for p in heldout}
    seen, kept, repeats, evaluated = set(), [], 0, 0
    for prompt in prompts:
        key = (tuple((m["role"], m["content"]) for m in prompt[:-1]), _question(prompt))
        if key[1] in banned:
            evaluated += 1
        elif key in seen:
            repeats += 1
        else:
            seen.add(key)
            kept.append(prompt)
    if repeats or evaluated:
        print(f"Training prompts: {len(kept)} kept; left out {repeats} repeats and {evaluated} that are evaluation "
              "prompts (data.eval_prompts)")
    return kept


def evaluation_questions(source: str | None) -> list[list[dict]]:
    """The prompts of `data.eval_prompts` (none when it is unset): what distinct_training_prompts keeps out."""
    return prompts_from_records(load_records(source)) if source else []


def without_evaluation_questions(records: datasets.Dataset, heldout: list[list[dict]]) -> datasets.Dataset:
    """Chat `records` (replies included) whose first question is none of `heldout`'s; says how many it left out."""
    banned = {_question(p) for p in heldout}
    if not banned or "messages" not in records.column_names:
        return records

    def kept(record) -> bool:
        found = first_prompt(record["messages"])
        return found is None or _question(found[0]) not in banned

    remaining = records.filter(kept)
    if len(remaining) < len(records):
        print(f"Training records: left out {len(records) - len(remaining)} whose question is an evaluation prompt "
              "(data.eval_prompts)")
    return remaining


def answered_prompts(records, model, tokenizer, *, num_prompts: int, max_prompt_tokens: int | None, cache_file,
                     max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
                     seed: int, heldout: Iterable[list[dict]] = ()) -> list[list[dict]]:
    """Self-distillation data: the chat `records` cut to their first prompt, each prompt once and none of `heldout`'s
    questions (distinct_training_prompts), shuffled with `seed` (mixing the sources), the first `num_prompts` of them,
    each with the target's reply (regenerate_responses: cached, resumable). With a finished cache nothing is generated,
    so this also reads back exactly what a run trained on."""
    prompts = prompts_from_records(records, max_prompt_tokens=max_prompt_tokens, tokenizer=tokenizer)
    prompts = distinct_training_prompts(prompts, heldout)
    if len(prompts) < num_prompts:
        print(f"Self-distillation: data.selfdistill.num_prompts={num_prompts}, and the prompts give {len(prompts)} "
              f"distinct questions: all {len(prompts)} are answered")
    random.Random(seed).shuffle(prompts)
    return regenerate_responses(model, tokenizer, prompts[:num_prompts], cache_file=cache_file,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                batch_size=batch_size, seed=seed)
