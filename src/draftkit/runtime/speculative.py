"""Speculative decoding for batch size 1: a drafter proposes a chain of tokens, the target checks them all in one forward.

Bookkeeping shared by both models: `sequence` ([1, L]) holds every committed token (prompt + generated so far). Each
model's KV cache covers a prefix of it, and a model's next forward starts by feeding the uncached suffix. The target's
cache always ends exactly one token short of `sequence`: the newest committed token came out of the target's own
logits and has not been fed back yet. The first verification therefore doubles as the prompt prefill.

Statistics follow Spec-Bench's definitions: every target forward yields `accepted draft tokens + 1` tokens (the
correction or bonus token), tau is the mean of that, and alpha_i counts draft position i only when positions < i were
accepted.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import torch
from torch import nn
from transformers import DynamicCache


@dataclass
class DraftProposal:
    """tokens: [k] proposed ids; probs: [k, V] the distributions they were sampled from (None when greedy);
    forwards: drafter forward passes spent on this proposal."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    forwards: int


class Drafter(Protocol):
    """The draft side of speculative decoding. The runtime never looks inside: any family (standalone LM, heads,
    feature drafters) plugs in by keeping its own state in step with the committed sequence."""

    def reset(self) -> None:
        """Forget all state; the next `propose` sees a new sequence."""

    def propose(
        self, sequence: torch.Tensor, num_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> DraftProposal:
        """Propose up to `num_tokens` tokens continuing `sequence` ([1, L], all committed tokens)."""

    def rollback(self, num_valid_tokens: int) -> None:
        """Only the first `num_valid_tokens` tokens seen so far (committed or proposed) are still valid."""


class FeatureDrafterProtocol(Drafter, Protocol):
    """A drafter that also reads the target's hidden states (feature drafters: EAGLE, FSPAD). It declares which one
    with `target_hidden` ("post_norm": the final norm's output, "pre_norm": its input), and after every target forward
    the runtime hands it the states of the positions that stay valid, before calling `rollback`."""

    target_hidden: str

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        """hidden: [1, m, H], the target's states for the next m committed positions (in sequence order)."""


@contextmanager
def capture_target_hidden(target_model: nn.Module, which: str | None):
    """While open, every forward of `target_model` leaves its last-layer states in the yielded dict under "hidden".
    which=None captures nothing (plain drafters pay no hook)."""
    box: dict[str, torch.Tensor] = {}
    if which is None:
        yield box
        return
    norm = target_model.get_decoder().norm
    if which == "post_norm":
        handle = norm.register_forward_hook(lambda _m, _i, output: box.__setitem__("hidden", output))
    elif which == "pre_norm":
        handle = norm.register_forward_pre_hook(lambda _m, inputs: box.__setitem__("hidden", inputs[0]))
    else:
        raise ValueError(f"drafter asks for target_hidden={which!r}; the runtime offers post_norm and pre_norm")
    try:
        yield box
    finally:
        handle.remove()


class Verifier(Protocol):
    """The target side: scores the committed sequence plus a draft in one forward. The default runs the whole target
    with its own KV cache; self-drafting families (Kangaroo) share target layers with their draft and bring their own."""

    def reset(self) -> None:
        """Forget all state; the next `logits` call sees a new sequence."""

    def logits(self, sequence: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """[k + 1, V]: row i predicts draft position i (row k the bonus token), for `sequence` [1, L] + `draft_tokens` [k]."""

    def rollback(self, num_valid_tokens: int) -> None:
        """Only the first `num_valid_tokens` tokens seen so far are still valid."""


def new_cache() -> DynamicCache:
    """A cache of full-length layers, even for sliding-window models (the mask still applies the window).

    Rollback needs the states a sliding-window layer would already have dropped. transformers' alternative, recording
    sliding layers (`activate_past_recording`), is missing before 5.x and breaks on multi-forward draft bursts in 5.17
    (huggingface/transformers#48280); full layers cost only memory, and only past the window.
    """
    return DynamicCache()


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of `cache`; a no-op when it holds fewer."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def choose_token(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [V]. Returns the chosen id (0-dim tensor, left on device) and the sampling distribution [V] (None if greedy)."""
    if temperature == 0.0:
        return logits.argmax(), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0], probs


class LMDrafter:
    """A standalone causal LM sharing the target's vocabulary, drafting a chain token by token with its own KV cache."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache: DynamicCache | None = None

    def reset(self) -> None:
        self.cache = new_cache()

    def propose(
        self, sequence: torch.Tensor, num_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> DraftProposal:
        device = self.model.device
        if num_tokens == 0:
            return DraftProposal(torch.empty(0, dtype=torch.long, device=device), None, 0)
        # After a full acceptance two tokens are uncached (the last draft token and the bonus), otherwise one.
        feed = sequence[:, self.cache.get_seq_length():].to(device)
        tokens, probs = [], []
        for position in range(num_tokens):
            logits = self.model(input_ids=feed, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
            token, prob = choose_token(logits[0, -1], temperature, generator)
            tokens.append(token)
            probs.append(prob)
            # The last proposal is never fed here: verification may reject it, and if it is accepted it gets fed
            # together with the bonus token at the next step.
            if position < num_tokens - 1:
                feed = token.view(1, 1)
        return DraftProposal(
            tokens=torch.stack(tokens),
            probs=None if temperature == 0.0 else torch.stack(probs),
            forwards=num_tokens,
        )

    def rollback(self, num_valid_tokens: int) -> None:
        truncate_cache(self.cache, num_valid_tokens)


class ModelVerifier:
    """The whole target model with a KV cache. The cache always ends one token short of the committed sequence: the
    newest committed token came out of the target's own logits and has not been fed back yet."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache: DynamicCache | None = None

    def reset(self) -> None:
        self.cache = new_cache()

    def logits(self, sequence: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        feed = torch.cat([sequence[:, self.cache.get_seq_length():], draft_tokens.view(1, -1)], dim=1)
        k = draft_tokens.numel()
        return self.model(input_ids=feed, past_key_values=self.cache, use_cache=True, logits_to_keep=k + 1).logits[0]

    def rollback(self, num_valid_tokens: int) -> None:
        truncate_cache(self.cache, num_valid_tokens)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens: [k]; target_logits: [k + 1, V] (row i predicts the token at draft position i).

    Returns (number of accepted draft tokens, next token) as device scalars: the target's argmax after the accepted prefix
    is the correction token on a mismatch and the bonus token after a full acceptance.
    """
    target_tokens = target_logits.argmax(dim=-1)
    k = draft_tokens.numel()
    num_accepted = (draft_tokens == target_tokens[:k]).long().cumprod(dim=0).sum()
    return num_accepted, target_tokens[num_accepted]


def verify_sampled(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    draft_tokens: [k]; draft_probs: [k, V] (None iff k == 0); target_logits: [k + 1, V].
    Draft token i is accepted with probability min(1, p_i(x) / q_i(x)); at the first rejection the replacement comes from
    normalize(max(0, p_i - q_i)); after a full acceptance the bonus token comes from p_k. Every branch is computed on
    device so the caller syncs once per step.
    """
    p = torch.softmax(target_logits.float() / temperature, dim=-1)
    k = draft_tokens.numel()
    if k == 0:
        return draft_tokens.new_zeros(()), torch.multinomial(p[0], 1, generator=generator)[0]
    rows = torch.arange(k, device=p.device)
    p_draft = p[rows, draft_tokens]
    q_draft = draft_probs[rows, draft_tokens]
    uniforms = torch.rand(k, generator=generator, device=p.device)
    # u < p/q written without the division; q > 0 at a token the draft sampled.
    accepted = uniforms * q_draft < p_draft
    num_accepted = accepted.long().cumprod(dim=0).sum()
    residuals = torch.cat([(p[:k] - draft_probs).clamp_min(0.0), p[k:]], dim=0)
    resample_from = residuals[num_accepted]
    # A rejection implies p < q at the draft token, hence positive residual mass somewhere; the fallback to p only
    # guards against that mass vanishing in floating point.
    resample_from = torch.where(resample_from.sum() > 0, resample_from, p[num_accepted])
    return num_accepted, torch.multinomial(resample_from, 1, generator=generator)[0]


@dataclass
class GenerationStats:
    """Counters for one generation. accepted_lengths[j]: tokens committed by target forward j (accepted drafts + 1, cut
    at EOS); proposed/accepted_per_position[i]: draft position i (0-based) reached / accepted, as verified (a draft
    token accepted past an EOS still counts: it measures the draft, not the output)."""

    target_forwards: int = 0
    draft_forwards: int = 0
    drafted_tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    proposed_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    wall_time_s: float = 0.0
    # Filled only by a profiled generation (profile=True): synced time inside the drafter and inside verification.
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    # Tree decoding: how often each node of the proposed tree lay on the accepted path. For a static tree node i is the
    # same path of candidate ranks at every step, so these counts price any subtree (runtime.predict.best_subtrees).
    accepted_nodes: list[int] = field(default_factory=list)
    # Trees grown by confidence, greedy: accepted_by_rank[d][r] counts accepted nodes of depth <= d + 1 whose confidence
    # rank among the tree's nodes of depth <= d + 1 was r; they price every smaller tree of the same growth
    # (runtime.predict.dynamic_tree_curve).
    accepted_by_rank: list[list[int]] = field(default_factory=list)

    def record_ranks(self, ranks: list[list[int]]) -> None:
        """One step's runtime.tree.confidence_ranks of the accepted path."""
        self.accepted_by_rank.extend([] for _ in range(len(ranks) - len(self.accepted_by_rank)))
        for row, step_ranks in zip(self.accepted_by_rank, ranks):
            for rank in step_ranks:
                row.extend([0] * (rank + 1 - len(row)))
                row[rank] += 1

    def record_step(self, *, committed: int, accepted: int, reachable: int, drafted: int, draft_forwards: int) -> None:
        """One target forward that kept `committed` tokens after `accepted` draft positions matched; draft positions
        below `reachable` existed (chain length, or tree depth), and those up to the first mismatch count as reached."""
        self.target_forwards += 1
        self.draft_forwards += draft_forwards
        self.drafted_tokens += drafted
        self.accepted_lengths.append(committed)
        for position in range(min(accepted + 1, reachable)):
            self.proposed_per_position[position] += 1
        for position in range(accepted):
            self.accepted_per_position[position] += 1

    @property
    def new_tokens(self) -> int:
        return sum(self.accepted_lengths)

    @property
    def tau(self) -> float:
        return self.new_tokens / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def alpha(self) -> list[float | None]:
        """Per draft position: accepted / reached; None where the position was never reached."""
        return [a / p if p else None for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    @property
    def draft_acceptance(self) -> float | None:
        """Accepted draft tokens / drafted tokens, counting drafts wasted after an earlier rejection."""
        return sum(self.accepted_per_position) / self.drafted_tokens if self.drafted_tokens else None


@dataclass
class GenerationOutput:
    tokens: list[int]
    stats: GenerationStats


def _eos_ids(eos_token_id: int | Iterable[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(i) for i in eos_token_id)


def _cut_after_eos(tokens: list[int], eos_ids: frozenset[int]) -> tuple[list[int], bool]:
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1], True
    return tokens, False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Adds the synced wall time of a block to a GenerationStats field when profiling; otherwise costs nothing (the
    runtime syncs once per step, and a profiled run adds one more sync per timed block)."""

    def __init__(self, stats: GenerationStats, device: torch.device, enabled: bool):
        self.stats, self.device, self.enabled = stats, device, enabled

    @contextmanager
    def __call__(self, field_name: str):
        if not self.enabled:
            yield
            return
        _synchronize(self.device)
        start = time.perf_counter()
        yield
        _synchronize(self.device)
        setattr(self.stats, field_name, getattr(self.stats, field_name) + time.perf_counter() - start)


def _check_prompt(input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [1, T] with T >= 1 (batch size 1); got {tuple(input_ids.shape)}")


def _sampling_generator(
    temperature: float, device: torch.device, generator: torch.Generator | None
) -> torch.Generator | None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
    if temperature > 0 and generator is None:
        return torch.Generator(device=device).manual_seed(0)
    return generator


def speculative_generate(
    target_model: nn.Module,
    drafter: Drafter,
    input_ids: torch.Tensor,
    *,
    gamma: int = 5,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    verifier: Verifier | None = None,
    profile: bool = False,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after `input_ids` ([1, T]) with chain speculative decoding.

    temperature 0 is greedy (output identical to the target's own greedy decoding, up to floating-point ties); above 0
    the output is distributed exactly as the target sampled at that temperature (applied to both models). Generation stops
    after the first EOS, which is kept. `generator` must live on the target's device; None means seed 0. `verifier`
    replaces the default whole-model verification (`ModelVerifier(target_model)`). `profile` times drafting and
    verification separately (stats.draft_time_s, stats.verify_time_s) for the speedup predictor (runtime.predict).
    """
    _check_prompt(input_ids)
    if gamma < 1:
        raise ValueError(f"gamma (draft tokens per step) must be >= 1; got {gamma}")
    device = input_ids.device
    generator = _sampling_generator(temperature, device, generator)
    eos_ids = _eos_ids(eos_token_id)
    verifier = verifier if verifier is not None else ModelVerifier(target_model)
    hidden_wanted = getattr(drafter, "target_hidden", None)
    if hidden_wanted is not None and not isinstance(verifier, ModelVerifier):
        raise ValueError("a feature drafter reads the whole target's hidden states, so it needs the default verifier")
    stats = GenerationStats(proposed_per_position=[0] * gamma, accepted_per_position=[0] * gamma)
    timed = StepTimer(stats, device, profile)
    generated: list[int] = []
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), capture_target_hidden(target_model, hidden_wanted) as captured:
        drafter.reset()
        verifier.reset()
        sequence = input_ids
        while len(generated) < max_new_tokens:
            # Each step commits at most k + 1 tokens, so shrinking k near the end never overshoots max_new_tokens.
            num_draft = min(gamma, max_new_tokens - len(generated) - 1)
            with timed("draft_time_s"):
                proposal = drafter.propose(sequence, num_draft, temperature, generator)
            draft_tokens = proposal.tokens.to(device)
            k = draft_tokens.numel()
            # Feature drafters read the states of the positions this forward feeds (the default verifier's cache tail).
            fed_from = verifier.cache.get_seq_length() if hidden_wanted is not None else 0
            with timed("verify_time_s"):
                logits = verifier.logits(sequence, draft_tokens)
            if temperature == 0.0:
                num_accepted, next_token = verify_greedy(draft_tokens, logits)
            else:
                draft_probs = None if proposal.probs is None else proposal.probs.to(device)
                num_accepted, next_token = verify_sampled(draft_tokens, draft_probs, logits, temperature, generator)
            # The one host sync of the step: the accepted count and the tokens, fetched together.
            host = torch.cat([num_accepted.view(1), next_token.view(1), draft_tokens]).tolist()
            n = host[0]
            new_tokens, hit_eos = _cut_after_eos(host[2 : 2 + n] + [host[1]], eos_ids)

            stats.record_step(committed=len(new_tokens), accepted=n, reachable=k, drafted=k,
                              draft_forwards=proposal.forwards)

            generated.extend(new_tokens)
            if hit_eos:
                break
            valid = sequence.shape[1] + n
            verifier.rollback(valid)
            if hidden_wanted is not None:
                drafter.observe_target_hidden(captured["hidden"][:, : valid - fed_from])
            drafter.rollback(valid)
            sequence = torch.cat([sequence, draft_tokens[:n].view(1, -1), next_token.view(1, 1)], dim=1)
    _synchronize(device)
    stats.wall_time_s = time.perf_counter() - start
    return GenerationOutput(tokens=generated, stats=stats)


def autoregressive_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Plain decoding of `model` after `input_ids` ([1, T]) with the same cache machinery: the speedup baseline.

    Every forward commits one token, so stats.accepted_lengths is all ones and tau = 1.
    """
    _check_prompt(input_ids)
    device = input_ids.device
    generator = _sampling_generator(temperature, device, generator)
    eos_ids = _eos_ids(eos_token_id)
    stats = GenerationStats()
    tokens: list[torch.Tensor] = []
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        # The same cache layout as speculative decoding, so the baseline pays the same attention cost per token.
        cache = new_cache()
        feed = input_ids
        for _ in range(max_new_tokens):
            logits = model(input_ids=feed, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token, _ = choose_token(logits[0, -1], temperature, generator)
            tokens.append(token)
            stats.target_forwards += 1
            # Without EOS ids nothing needs the token on the host, so the loop runs without a sync per token.
            if eos_ids and token.item() in eos_ids:
                break
            feed = token.view(1, 1)
        generated = torch.stack(tokens).tolist() if tokens else []
    _synchronize(device)
    stats.wall_time_s = time.perf_counter() - start
    stats.accepted_lengths = [1] * len(generated)
    return GenerationOutput(tokens=generated, stats=stats)
