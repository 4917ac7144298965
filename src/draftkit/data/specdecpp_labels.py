"""SpecDec++ acceptance labels (Huang et al. 2024): what the acceptance head learns to predict.

For each prompt the target samples a response X. With the pair (prompt, X) fed once through both models, the draft's
distribution q_i at response position i is conditioned on prompt + X_<i, and so is the target's p_i. The draft samples
its proposal Y_i ~ q_i, and the soft label of Y_i is a_i = min(1, p_i(Y_i) / q_i(Y_i)), the probability that
speculative sampling accepts it (both distributions at the sampling temperature; at temperature 0 both models are
greedy and a_i = 1 exactly when Y_i is the target's argmax). The head's training input is Z = Y, except at a seeded
fraction of positions where Z_i = X_i (the reference's mixing, so the head also sees accepted contexts); those carry
no loss. The head reads the draft's hidden state at the position whose input token is Z_i.

Storage: one safetensors shard per generation batch, `shard_00000.safetensors`, ... Each appears complete or not at
all (written under a temporary name, then renamed), and each records in its metadata the key of everything it depends
on (both models' fingerprints, the prompts, the settings), so an interrupted build resumes at the first missing shard
and a folder built for anything else is refused. A batch's randomness comes from (seed, batch index) alone, so a
resumed build writes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from draftkit.data.rollout import assemble, continuation_mask, left_pad, right_pad, sample_continuations
from draftkit.data.sources import DataError

LABELS_VERSION = 1
# Rows scored per forward: both models' logits over the response are [rows, N, V] in fp32, so a GPU batch in the
# hundreds is scored in slices to bound memory.
SCORE_ROWS = 64


def check_label_settings(*, temperature: float, mixing_fraction: float, max_new_tokens: int, batch_size: int) -> None:
    problems = []
    if not 0.0 <= mixing_fraction < 1.0:
        problems.append(f"specdecpp.labels.mixing_fraction={mixing_fraction} must lie in [0, 1) (the share of "
                        "positions that keep the target's token; 1 would leave no position to learn from)")
    if temperature < 0:
        problems.append(f"specdecpp.labels.temperature={temperature} must be >= 0 (0 = greedy)")
    if max_new_tokens < 1 or batch_size < 1:
        problems.append(f"specdecpp.labels.max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))


def acceptance_labels(target_logits: torch.Tensor, draft_logits: torch.Tensor, proposals: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """[..., V], [..., V], [...] -> [...]: min(1, p(y) / q(y)) at the proposals y (greedy: target argmax == y)."""
    if temperature == 0:
        return (target_logits.argmax(-1) == proposals).float()
    index = proposals.unsqueeze(-1)
    log_p = F.log_softmax(target_logits.float() / temperature, dim=-1).gather(-1, index).squeeze(-1)
    log_q = F.log_softmax(draft_logits.float() / temperature, dim=-1).gather(-1, index).squeeze(-1)
    return (log_p - log_q).clamp(max=0.0).exp()


def draft_proposals(draft_logits: torch.Tensor, temperature: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] -> (proposals [...], their draft probabilities [...]): sampled at `temperature`, argmax at 0 (its
    probability is then the draft's top-1 confidence at temperature 1, what a confidence stop rule reads)."""
    probs = torch.softmax(draft_logits.float() / (temperature or 1.0), dim=-1)
    if temperature == 0:
        proposals = probs.argmax(-1)
    else:
        flat = probs.reshape(-1, probs.shape[-1])
        proposals = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
    return proposals, probs.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)


def mix_inputs(target_tokens: torch.Tensor, proposals: torch.Tensor, counted: torch.Tensor, fraction: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Z = proposals except where a seeded coin (probability `fraction`) keeps the target's token; loss only on
    counted positions that hold a proposal. Returns (Z, loss_mask), both [B, N]."""
    keep_target = torch.rand(counted.shape, generator=generator).to(counted.device) < fraction
    return torch.where(keep_target, target_tokens, proposals), counted & ~keep_target


@torch.no_grad()
def label_batch(target_model, draft_model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, temperature: float,
                max_new_tokens: int, mixing_fraction: float, stop_ids: Sequence[int], pad_token_id: int,
                seed: int) -> dict[str, torch.Tensor]:
    """One batch of left-padded prompts [B, P] -> the shard's tensors (on the CPU): prompt_ids, prompt_mask, tokens
    (Z), accept (a), draft_prob (q(Y)), loss_mask, counted: [B, N] each, N = max_new_tokens."""
    responses = sample_continuations(target_model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                     temperature=temperature, stop_ids=stop_ids, pad_token_id=pad_token_id, seed=seed)
    lengths = torch.full((responses.shape[0],), max_new_tokens, dtype=torch.long)
    counted = continuation_mask(responses, lengths, stop_ids)
    rollout = assemble(prompt_ids, prompt_mask, responses, counted, pad_token_id)
    device = prompt_ids.device
    proposal_generator = torch.Generator(device=device).manual_seed(seed + 1)
    proposals, accept, draft_prob = [], [], []
    for start in range(0, prompt_ids.shape[0], SCORE_ROWS):
        rows = slice(start, start + SCORE_ROWS)
        inputs = {"input_ids": rollout.input_ids[rows], "attention_mask": rollout.attention_mask[rows],
                  "position_ids": rollout.position_ids[rows], "logits_to_keep": max_new_tokens + 1}
        # Column P-1+i predicts response token i; the final column predicts past the end and is dropped.
        target_logits = target_model(**inputs).logits[:, :-1]
        draft_logits = draft_model(**inputs).logits[:, :-1]
        chosen, prob = draft_proposals(draft_logits, temperature, proposal_generator)
        proposals.append(chosen)
        draft_prob.append(prob)
        accept.append(acceptance_labels(target_logits, draft_logits, chosen, temperature))
    counted = counted.to(device)
    tokens, loss_mask = mix_inputs(responses, torch.cat(proposals), counted, mixing_fraction,
                                   torch.Generator().manual_seed(seed + 2))
    tensors = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
               "tokens": tokens.masked_fill(~counted, pad_token_id), "accept": torch.cat(accept) * counted,
               "draft_prob": torch.cat(draft_prob) * counted, "loss_mask": loss_mask, "counted": counted}
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def labels_key(identity: dict, prompts: Sequence[Sequence[int]], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({"version": LABELS_VERSION, "identity": identity, "settings": settings},
                                       sort_keys=True).encode())
    for prompt in prompts:
        digest.update(json.dumps(list(prompt)).encode())
    return digest.hexdigest()[:32]


def _shard_key(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key")


def build_acceptance_labels(
    target_model, draft_model, prompts: Sequence[Sequence[int]], cache_dir: str | os.PathLike, *, identity: dict,
    temperature: float, max_new_tokens: int, mixing_fraction: float, batch_size: int, seed: int,
    stop_ids: Sequence[int], pad_token_id: int, progress: bool = True, desc: str = "acceptance labels",
) -> LabelledExamples:
    """Label every prompt (token id lists) into `cache_dir`, resuming an interrupted build; returns the examples
    (`read_labels`). `identity` names what the labels depend on besides the prompts and settings (fingerprints of
    the target and the draft)."""
    check_label_settings(temperature=temperature, mixing_fraction=mixing_fraction, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    if not prompts:
        raise DataError("no prompts to label; check data.prompts and specdecpp.labels.num_prompts")
    settings = {"temperature": float(temperature), "max_new_tokens": max_new_tokens,
                "mixing_fraction": float(mixing_fraction), "batch_size": batch_size, "seed": seed,
                "stop_ids": sorted(stop_ids)}
    key = labels_key(identity, prompts, settings)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(draft_model.parameters()).device
    num_shards = -(-len(order) // batch_size)
    paths = [cache_dir / f"shard_{shard:05d}.safetensors" for shard in range(num_shards)]
    with tqdm(total=len(order), desc=desc, unit="prompt", disable=not progress) as bar:
        for shard, path in enumerate(paths):
            batch = order[shard * batch_size:(shard + 1) * batch_size]
            if path.is_file():
                if _shard_key(path) != key:
                    raise DataError(
                        f"{cache_dir} holds acceptance labels made for another target, draft, prompt set or label "
                        "settings; labels of another pair would train a wrong head. Fix: delete that folder (or use "
                        "a new run directory) to label again")
                bar.update(len(batch))
                continue
            ids, mask = left_pad([prompts[i] for i in batch], pad_token_id)
            tensors = label_batch(target_model, draft_model, ids.to(device), mask.to(device), temperature=temperature,
                                  max_new_tokens=max_new_tokens, mixing_fraction=mixing_fraction, stop_ids=stop_ids,
                                  pad_token_id=pad_token_id, seed=seed * 1_000_003 + shard)
            tensors["prompt_index"] = torch.tensor(batch, dtype=torch.long)
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(tensors, str(staging), metadata={"key": key})
            os.replace(staging, path)
            bar.update(len(batch))
    return read_labels(paths)


class LabelledExamples(list):
    """The labelled examples, each with its token count (prompt and response: what a collated row holds), so the
    engine can group micro-batches by length (engine.group_by_length)."""

    @property
    def lengths(self) -> list[int]:
        return [len(example["prompt_ids"]) + len(example["tokens"]) for example in self]


def read_labels(paths: Sequence[Path]) -> LabelledExamples:
    """Shards -> one example per prompt, in prompt order: {"prompt_ids", "tokens", "accept", "draft_prob",
    "loss_mask"} (lists over the response's counted positions)."""
    examples = {}
    for path in paths:
        t = load_file(str(path))
        for row, index in enumerate(t["prompt_index"].tolist()):
            length = int(t["counted"][row].sum())
            examples[index] = {
                "prompt_ids": t["prompt_ids"][row][t["prompt_mask"][row].bool()].tolist(),
                "tokens": t["tokens"][row, :length].tolist(), "accept": t["accept"][row, :length].tolist(),
                "draft_prob": t["draft_prob"][row, :length].tolist(),
                "loss_mask": t["loss_mask"][row, :length].tolist()}
    return LabelledExamples(examples[i] for i in sorted(examples))


def _right_pad_values(rows: Sequence[Sequence], width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=dtype)
    for row, values in enumerate(rows):
        out[row, :len(values)] = torch.as_tensor(list(values), dtype=dtype)
    return out


def collate_labels(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Labelled examples -> the draft's inputs (left-padded prompt + right-padded Z: input_ids, attention_mask,
    position_ids [B, P+N]) and the head's targets (accept, loss_mask [B, N], column i = Z_i at input column P+i)."""
    prompt_ids, prompt_mask = left_pad([e["prompt_ids"] for e in examples], pad_token_id)
    width = max(1, max(len(e["tokens"]) for e in examples))
    tokens = right_pad([e["tokens"] for e in examples], pad_token_id, width=width)
    counted = torch.arange(width)[None, :] < torch.tensor([len(e["tokens"]) for e in examples])[:, None]
    rollout = assemble(prompt_ids, prompt_mask, tokens, counted, pad_token_id)
    return {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
            "position_ids": rollout.position_ids,
            "accept": _right_pad_values([e["accept"] for e in examples], width, torch.float32),
            "loss_mask": _right_pad_values([e["loss_mask"] for e in examples], width, torch.bool)}
