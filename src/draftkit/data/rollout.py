"""Sequences for distillation: prompts continued by the draft (on-policy), by the target, or by a dataset reply.

Layout of a batch (`Rollout`): prompts are left-padded to a common width P, so every continuation starts at column P
and the positions that predict continuation tokens are the same columns P-1 .. P+N-2 for every row. Scoring a batch
therefore needs logits for only the last N+1 positions (`logits_to_keep`), never for the prompt. Continuations are
right-padded after their stop token. Left padding makes position ids differ from column indices; `position_ids` holds
the right ones, and every forward over a rollout must pass them (HF models count positions from the cache otherwise).

Only continuation tokens count: not the prompt, not padding, nothing after the first stop token (which itself counts:
predicting the end of the answer is part of what the draft must agree on).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch

from draftkit.data.chat import first_prompt, prompt_ids, render_chat


@dataclass
class Rollout:
    """input_ids, attention_mask, position_ids: [B, P+N]; continuation_mask [B, N]: which continuation tokens count."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    continuation_mask: torch.Tensor
    prompt_width: int

    @property
    def num_new(self) -> int:
        return self.continuation_mask.shape[1]


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, W], mask [B, W]) padded on the left."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, width: int | None = None) -> torch.Tensor:
    """Token lists -> ids [B, W] padded (or cut) on the right to `width` (default: the longest)."""
    width = max((len(s) for s in sequences), default=0) if width is None else width
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = list(seq)[:width]
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids


def continuation_mask(continuations: torch.Tensor, lengths: torch.Tensor, stop_ids: Iterable[int]) -> torch.Tensor:
    """[B, N] bool: tokens before each row's `lengths` bound, up to and including its first stop token."""
    columns = torch.arange(continuations.shape[1], device=continuations.device)
    within = columns[None, :] < lengths.to(continuations.device)[:, None]
    stops = torch.isin(continuations, torch.as_tensor(sorted(set(stop_ids)), device=continuations.device)) & within
    # Stops strictly before a column: the column is past the end of the answer.
    stops_before = torch.cumsum(stops.long(), dim=1) - stops.long()
    return within & (stops_before == 0)


def assemble(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, continuations: torch.Tensor,
             counted: torch.Tensor, pad_token_id: int) -> Rollout:
    """Left-padded prompts [B, P] + continuations [B, N] with their counted mask [B, N] -> Rollout."""
    continuations = continuations.masked_fill(~counted, pad_token_id)
    input_ids = torch.cat([prompt_ids, continuations.to(prompt_ids.device)], dim=1)
    attention_mask = torch.cat([prompt_mask, counted.to(prompt_mask.device).long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)
    return Rollout(input_ids, attention_mask, position_ids, counted.to(prompt_ids.device), prompt_ids.shape[1])


@torch.no_grad()
def sample_continuations(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                         temperature: float, stop_ids: Iterable[int], pad_token_id: int, seed: int) -> torch.Tensor:
    """[B, max_new_tokens] continuations of left-padded prompts by `model` (KV cache, the whole batch at once).

    temperature 0 is greedy; above 0 it is pure sampling at that temperature: every other knob (top-k, top-p,
    repetition penalty) is pinned off so the shipped generation_config cannot change the distribution the
    divergence is estimated under. Sampling is seeded by `seed` without touching the caller's RNG streams.
    """
    stop_ids = sorted(set(stop_ids))
    sampling = temperature > 0
    was_training = model.training
    model.eval()
    devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, min_new_tokens=0,
            do_sample=sampling, temperature=temperature if sampling else 1.0, top_k=0 if sampling else None,
            top_p=1.0, repetition_penalty=1.0, eos_token_id=stop_ids, pad_token_id=pad_token_id, use_cache=True,
        )
    model.train(was_training)
    new = output[:, prompt_ids.shape[1]:]
    if new.shape[1] < max_new_tokens:  # generation stops once every row has ended
        new = torch.cat([new, new.new_full((new.shape[0], max_new_tokens - new.shape[1]), pad_token_id)], dim=1)
    return new


class TeacherRollouts:
    """Continuations of a fixed prompt list by a frozen model, written a whole round at a time in large batches.

    A frozen model's samples do not depend on the training step, so rather than one generate call per micro-batch
    (launch-bound on a GPU when the model is small: DistillSpec's steps on SmolLM2-135M spent ~2 s each generating),
    the prompts of a round are continued in batches of `batch_size`, prompts of similar length side by side so little
    is padding. Round r serves the r-th training epoch. `plan` maps a round to the prompts this process will read in
    it (a data-parallel rank reads only its share, and a run shorter than an epoch only part of the list); without a
    plan every prompt is written. A round is sampled under seeds derived from (seed, r) and its planned prompts alone,
    so a resumed run that asks for round r gets what the uninterrupted run got. A prompt read outside its plan is
    written when asked for (a plan is a forecast, not a contract). Greedy continuations are the same in every round,
    so one round holds every planned prompt. One round is kept at a time, on the CPU.
    """

    def __init__(self, model, prompts: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
                 temperature: float, stop_ids: Iterable[int], pad_token_id: int, seed: int,
                 plan: Mapping[int, Sequence[int]] | None = None, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stop_ids = sorted(set(stop_ids))
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.progress = progress
        if plan is not None and temperature == 0:
            plan = {0: sorted({i for planned in plan.values() for i in planned})}
        self.plan = plan
        self.rounds_written = 0
        self.prompts_written = 0
        self.unplanned_written = 0
        self._round: int | None = None
        self._continuations = torch.empty(0)
        self._written = torch.zeros(len(self.prompts), dtype=torch.bool)

    def prepare(self, round_index: int) -> None:
        """Write round `round_index`'s planned prompts now (nothing when it is the round held): a caller that knows
        which round comes first can write it before the training loop starts, so the loop's first step (and its
        progress bar's ETA) does not carry a whole round of generation."""
        wanted = 0 if self.temperature == 0 else round_index
        if wanted == self._round:
            return
        self._round = wanted
        self._continuations = torch.full((len(self.prompts), self.max_new_tokens), self.pad_token_id, dtype=torch.long)
        self._written.zero_()
        planned = range(len(self.prompts)) if self.plan is None else self.plan.get(wanted, [])
        self._write(sorted(set(planned)), wanted, "planned")
        self.rounds_written += 1

    def continuations(self, indices: torch.Tensor, round_index: int) -> torch.Tensor:
        """[len(indices), max_new_tokens] continuations of the prompts at `indices`, from round `round_index`."""
        wanted = 0 if self.temperature == 0 else round_index
        indices = indices.cpu()
        self.prepare(round_index)
        missing = sorted(set(indices[~self._written[indices]].tolist()))
        if missing:
            self._write(missing, wanted, f"unplanned from {missing[0]}")
            self.unplanned_written += len(missing)
        return self._continuations[indices]

    def _write(self, chosen: list[int], round_index: int, part: str) -> None:
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        by_length = sorted(chosen, key=lambda i: len(self.prompts[i]))
        chunks = [by_length[start:start + self.batch_size] for start in range(0, len(by_length), self.batch_size)]
        # The seed names the chunk's place in the round, so the same plan writes the same samples on every run.
        base = f"{self.seed}/{round_index}/{part}"
        for number, chunk in enumerate(tqdm(chunks, desc=f"teacher rollouts, round {round_index}",
                                            disable=not self.progress or not chunks, leave=False)):
            ids, mask = left_pad([self.prompts[i] for i in chunk], self.pad_token_id)
            seed = int.from_bytes(hashlib.sha256(f"{base}/{number}".encode()).digest()[:7], "little")
            self._continuations[chunk] = sample_continuations(
                self.model, ids.to(device), mask.to(device), max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, stop_ids=self.stop_ids, pad_token_id=self.pad_token_id, seed=seed).cpu()
        self._written[chosen] = True
        self.prompts_written += len(chosen)


def prompt_reply_examples(records, tokenizer, *, max_prompt_tokens: int | None = None) -> list[dict]:
    """Chat records -> [{"prompt_ids", "reply_ids"}]: the conversation up to its first user turn (system turns kept),
    and the tokens of the assistant reply that follows it in the record ([] when there is none).

    The reply's tokens are what the chat template renders after the generation prompt, end-of-turn token included,
    so a dataset reply and a generated one are scored on the same footing. Prompts longer than `max_prompt_tokens`
    are skipped.
    """
    examples = []
    for record in records:
        messages = record["messages"]
        found = first_prompt(messages)
        if found is None:
            continue
        prompt, first_user = found
        ids = prompt_ids(prompt, tokenizer)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            continue
        reply: list[int] = []
        following = messages[first_user + 1] if first_user + 1 < len(messages) else None
        if following is not None and following["role"] == "assistant":
            full = tokenizer(render_chat(prompt + [following], tokenizer), add_special_tokens=False)["input_ids"]
            if full[: len(ids)] == ids:  # templates that re-render the prompt differently give no usable reply
                reply = full[len(ids):]
        examples.append({"prompt_ids": ids, "reply_ids": reply})
    return examples


class PromptExamples(list):
    """prompt_reply_examples' output with its prompt lengths, which engine.group_by_length batches by (similar
    prompt lengths side by side: less left padding in every rollout)."""

    @property
    def lengths(self) -> list[int]:
        return [len(example["prompt_ids"]) for example in self]


def collate_prompts(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Prompt examples -> {"prompt_ids", "attention_mask"} (left-padded) and {"reply_ids", "reply_lengths"}, plus
    "example_index" when the examples carry an "index" (their place in the prompt list, for TeacherRollouts)."""
    prompt_ids_, attention_mask = left_pad([e["prompt_ids"] for e in examples], pad_token_id)
    replies = [e["reply_ids"] for e in examples]
    batch = {"prompt_ids": prompt_ids_, "attention_mask": attention_mask,
             "reply_ids": right_pad(replies, pad_token_id, width=max(1, max(len(r) for r in replies))),
             "reply_lengths": torch.tensor([len(r) for r in replies], dtype=torch.long)}
    if all("index" in e for e in examples):
        batch["example_index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch
