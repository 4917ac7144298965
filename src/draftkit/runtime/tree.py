"""Tree speculative decoding for batch size 1: a drafter proposes a token tree, the target verifies it in one forward.

Stable API (other draft families build on it; extend it, do not change it):

* `DraftTree(tokens, parents, forwards, scores)`: the candidates. `tokens[i]` is node i's token id, `parents[i]` its
  parent node (-1 = the root, i.e. the newest committed token). Parents come before their children. A chain is a tree
  whose node i has parent i - 1. `scores` (optional) is each node's confidence as the draft's log-probability of its
  whole path; trees grown by confidence carry it, and the runtime then records the confidence rank of every accepted
  node, which prices smaller trees of the same kind (runtime.predict.dynamic_tree_curve).
* `TargetStep(sequence, hidden, prenorm_hidden, start, aux_hidden)`: what the target computed for the tokens it
  committed since the drafter was last asked. `sequence` [1, L] holds every committed token; the target's KV cache covers positions
  [0, L - 1) (the newest token came out of the target's logits and has not been fed yet). `hidden` [n, H] is the
  target's final hidden state after the final norm (what the LM head reads) at positions [start, L - 1), and
  `prenorm_hidden` the same positions before the final norm; `hidden[-1]` is the state whose logits produced
  `sequence[0, -1]`. Successive steps tile the positions: the next step's `start` is this step's `L - 1`. Only
  committed positions are ever reported, so a drafter with its own KV cache (an EAGLE-style feature drafter) crops
  that cache back to `start` and feeds the new states. `aux_hidden` [n, k * H] is filled only for a drafter whose
  `target_hidden` is a tuple of layer ids (EAGLE-3): the residual streams entering those layers, concatenated
  (runtime.speculative.capture_target_hidden), for the same positions; None otherwise.
* `TreeDrafter` protocol: `reset()` before each generation, `propose_tree(step) -> DraftTree`, and `max_depth` (the
  deepest tree it proposes, which sizes the per-depth statistics).
* Tree shapes: `StaticTree(paths)` (Medusa-style: each path lists, per depth, the rank of the candidate among its
  parent's top-k; `StaticTree.chain(depth)` is the top-1 chain), `TopKTree(depth, top_k, width, budget)` (per-step
  tree: every depth expands the `width` best nodes by cumulative draft log-probability into `top_k` children each,
  and the `budget` best nodes overall are kept) and `DynamicTree(depth, top_k, total_tokens)` (EAGLE-2's dynamic tree:
  the same growth by confidence with as many nodes expanded per depth as children per node, reranked and pruned to
  `total_tokens`). `grow_tree(shape, expander)` builds any of them from a `TreeExpander`, whose
  `expand(tree_so_far, frontier, depth, k)` returns the top-k tokens and log-probabilities of each frontier node.
* `tree_generate(target_model, drafter, input_ids, ...)`: the decoding loop, returning the chain runtime's
  `GenerationOutput`; `proposed_per_position[d]` / `accepted_per_position[d]` count tree depth d + 1, so alpha is
  per depth and tau is tokens per target forward (the prompt prefill counts as one forward that yields one token).
  With greedy verification of a tree that carries scores, `accepted_by_rank[d][r]` counts the accepted nodes of depth
  <= d + 1 whose confidence rank among the tree's nodes of depth <= d + 1 was r (`confidence_ranks`).

Verification: `acceptance="greedy"` (the default) walks from the root, following the child whose token is the
target's argmax; it is lossless (output = the target's greedy output, tested in fp32). `acceptance="sampling"` is
lossless at any temperature: each node's children are tried in order as point-mass proposals against the target's
distribution with the rejected ones removed (tested against the target's exact distribution). `acceptance="typical"` is
Medusa's typical acceptance (Cai et al. 2024): a child is accepted when the target gives its token probability above
min(posterior_threshold, posterior_alpha * exp(-entropy)), the deepest accepted node wins and the next token is
sampled from the target at `temperature`. It is LOSSY: the output no longer follows the target's distribution.

KV cache: the target sees the uncommitted suffix plus all tree nodes in one pass, with a tree attention mask (a node
attends to the committed tokens and its ancestors) and position ids = position of the root + depth. Afterwards the
accepted path's KV entries are copied into contiguous slots right after the committed ones and the rest is dropped (a
pruned branch's entries would otherwise sit between committed ones). The mask is an additive float mask, which the eager
and SDPA attention paths of transformers take as is; flash-attention kernels cannot express a tree mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Protocol, Union

import torch
from torch import nn
from transformers import DynamicCache

from draftkit.runtime.speculative import (
    GenerationOutput,
    GenerationStats,
    StepTimer,
    _check_prompt,
    _cut_after_eos,
    _eos_ids,
    _sampling_generator,
    _synchronize,
    capture_target_hidden,
    new_cache,
)

ACCEPTANCE = ("greedy", "sampling", "typical")


@dataclass
class DraftTree:
    """tokens: [N] candidate ids; parents[i] < i is node i's parent (-1 = the root); forwards: drafter passes spent;
    scores: [N] each node's path log-probability under the draft (None when the tree was not grown by confidence)."""

    tokens: torch.Tensor
    parents: list[int]
    forwards: int = 0
    scores: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.dim() != 1 or self.tokens.numel() != len(self.parents):
            raise ValueError(f"tree has {self.tokens.numel()} tokens but {len(self.parents)} parents")
        if self.scores is not None and self.scores.shape != self.tokens.shape:
            raise ValueError(f"tree has {self.tokens.numel()} tokens but {self.scores.numel()} scores")
        for index, parent in enumerate(self.parents):
            if not -1 <= parent < index:
                raise ValueError(f"node {index} has parent {parent}; parents must precede their children (-1 = root)")

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def depths(self) -> list[int]:
        """Depth of each node: 1 for children of the root."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return depths

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root's child down to `node`."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> "DraftTree":
        return DraftTree(torch.empty(0, dtype=torch.long, device=device), [])


@dataclass
class TargetStep:
    """The target's states for newly committed positions (see the module docstring for the exact convention)."""

    sequence: torch.Tensor
    hidden: torch.Tensor
    prenorm_hidden: torch.Tensor
    start: int
    aux_hidden: torch.Tensor | None = None


class TreeDrafter(Protocol):
    """Draft side of tree decoding. `max_depth` bounds every proposed tree's depth."""

    max_depth: int

    def reset(self) -> None:
        """Forget all state; the next `propose_tree` starts a new sequence (its step has start = 0)."""

    def propose_tree(self, step: TargetStep) -> DraftTree:
        """Candidates continuing `step.sequence`; `step` reports the target's states of the newly committed positions."""


class TreeExpander(Protocol):
    def expand(self, tree: DraftTree, frontier: list[int], depth: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k children of each frontier node (-1 = root) at `depth`: (token ids [F, k], log-probabilities [F, k]),
        best first. `tree` holds the nodes grown so far (all of depth < `depth`)."""


@dataclass(frozen=True)
class StaticTree:
    """A fixed tree: each path gives, per depth, the rank of the chosen candidate among its parent's top-k."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        known = set(self.paths)
        if len(known) != len(self.paths) or not self.paths:
            raise ValueError("a static tree needs distinct, non-empty paths")
        for path in self.paths:
            if not path or min(path) < 0:
                raise ValueError(f"tree path {path}: ranks are non-negative and a path is non-empty")
            if len(path) > 1 and path[:-1] not in known:
                raise ValueError(f"tree path {path} has no parent path {path[:-1]}; list every prefix of every path")

    @classmethod
    def chain(cls, depth: int) -> "StaticTree":
        if depth < 1:
            raise ValueError(f"a chain needs depth >= 1; got {depth}")
        return cls(tuple((0,) * d for d in range(1, depth + 1)))

    @classmethod
    def from_paths(cls, paths: Iterable[Iterable[int]]) -> "StaticTree":
        return cls(tuple(sorted((tuple(int(r) for r in p) for p in paths), key=lambda p: (len(p), p))))

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def candidates(self) -> int:
        """How many top candidates of one node the tree reads (its largest rank + 1)."""
        return max(max(p) for p in self.paths) + 1


@dataclass(frozen=True)
class TopKTree:
    """Per-step tree: expand the `width` best nodes of each depth into `top_k` children; keep the `budget` best nodes."""

    depth: int
    top_k: int = 4
    width: int = 4
    budget: int = 16

    def __post_init__(self):
        if min(self.depth, self.top_k, self.width, self.budget) < 1:
            raise ValueError(f"top-k tree settings must all be >= 1; got {self}")

    @property
    def size(self) -> int:
        return self.budget

    @property
    def candidates(self) -> int:
        return self.top_k


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's dynamic draft tree (Li et al. 2024): grown and pruned by the draft's confidence in each node, the
    product of the draft's probabilities along its path (the sum of log-probabilities here).

    Depth 1 holds the root's `top_k` most likely tokens. Each further depth expands the `top_k` nodes of the previous
    depth with the highest confidence into their `top_k` most likely children. Then every drafted node is reranked by
    confidence and the best `total_tokens` are verified: a node never outranks its parent, so they form a tree. A
    TopKTree whose width equals its top_k grows the same tree; this shape names EAGLE-2's parameters.

    EAGLE-2's code (SafeAILab/EAGLE ea_model.py, defaults total_token=60, depth=5, top_k=10) counts the root in
    total_token and runs `depth` expansions after the root's: its tree has 59 drafted nodes and depth 6, the default
    here. `total_tokens` counts drafted nodes; the target verifies them plus the newest committed token."""

    depth: int = 6
    top_k: int = 10
    total_tokens: int = 59

    def __post_init__(self):
        if min(self.depth, self.top_k, self.total_tokens) < 1:
            raise ValueError(f"dynamic tree settings must all be >= 1; got {self}")

    @property
    def size(self) -> int:
        return self.total_tokens

    @property
    def candidates(self) -> int:
        return self.top_k


TreeShape = Union[StaticTree, TopKTree, DynamicTree]
TREE_KINDS = ("chain", "static", "topk", "dynamic")

# A 21-node tree of depth 4 in the spirit of Medusa's mc_sim trees (which were tuned for 7B models and 5 heads):
# wide near the root, where acceptance is likeliest, narrow deeper down.
DEFAULT_STATIC_PATHS = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0), (1, 0, 0, 0),
)


def describe_shape(shape: TreeShape) -> dict:
    """What a report records about the tree it decoded with."""
    if isinstance(shape, StaticTree):
        chain = shape == StaticTree.chain(shape.depth)
        return {"kind": "chain" if chain else "static", "depth": shape.depth, "size": shape.size,
                **({} if chain else {"paths": [list(p) for p in shape.paths]})}
    if isinstance(shape, TopKTree):
        return {"kind": "topk", "depth": shape.depth, "top_k": shape.top_k, "width": shape.width,
                "budget": shape.budget}
    if isinstance(shape, DynamicTree):
        return {"kind": "dynamic", "depth": shape.depth, "top_k": shape.top_k, "total_tokens": shape.total_tokens}
    raise TypeError(f"unknown tree shape {type(shape).__name__}")


def check_tree_fits_vocabulary(shape: TreeShape, draft_vocab_size: int) -> None:
    """A tree reading a node's top-k needs k tokens to choose from; a small draft vocabulary (drafts/vocab.py) may not
    have them, which torch.topk would only report as an index error mid-decoding."""
    if shape.candidates > draft_vocab_size:
        raise ValueError(f"this tree reads the top {shape.candidates} candidates of a node, but the draft scores only "
                         f"{draft_vocab_size} tokens. Fix: a larger <recipe>.draft_vocab_size, or a narrower tree")


def check_scoring_rows(lm_head_weight: torch.Tensor | None, module) -> None:
    """A shared LM head must have one row per draft id: a full head on a restricted draft would propose ids past the
    token_map, and a sliced one on a full draft would propose the wrong tokens."""
    if lm_head_weight is not None and lm_head_weight.shape[0] != module.draft_vocab_size:
        raise ValueError(f"the shared LM head has {lm_head_weight.shape[0]} rows but the draft scores "
                         f"{module.draft_vocab_size} tokens. Fix: pass the LM head's token_map rows "
                         "(drafts.vocab.draft_rows(weight, module.token_map))")


def check_heads_tree(shape: TreeShape, heads, lm_head_weight: torch.Tensor | None, family: str) -> None:
    """A tree for draft heads: head d - 1 drafts depth d, so the tree is at most as deep as there are heads; its shared
    LM head has one row per draft id and each node's top-k fits the draft vocabulary."""
    if shape.depth > heads.num_heads:
        raise ValueError(f"a tree of depth {shape.depth} needs {shape.depth} {family} heads; this draft has "
                         f"{heads.num_heads}. Fix: a shallower tree (tree depth <= num_heads)")
    check_scoring_rows(lm_head_weight, heads)
    check_tree_fits_vocabulary(shape, heads.draft_vocab_size)


def tree_shape(kind: str, depth: int, *, top_k: int = 4, width: int = 4, budget: int = 16,
               paths: Iterable[Iterable[int]] | None = None) -> TreeShape:
    """A shape by name: "chain" (top-1 per depth), "static" (`paths`, or the default tree cut at `depth`), "topk",
    "dynamic" (EAGLE-2's, `budget` drafted nodes; `width` is its `top_k`)."""
    if kind == "chain":
        return StaticTree.chain(depth)
    if kind == "static":
        chosen = paths if paths is not None else [p for p in DEFAULT_STATIC_PATHS if len(p) <= depth]
        return StaticTree.from_paths(chosen)
    if kind == "topk":
        return TopKTree(depth=depth, top_k=top_k, width=width, budget=budget)
    if kind == "dynamic":
        return DynamicTree(depth=depth, top_k=top_k, total_tokens=budget)
    raise ValueError(f"unknown tree kind {kind!r}: choose one of {', '.join(TREE_KINDS)}")


def _grow_static(shape: StaticTree, expander: TreeExpander, device) -> DraftTree:
    node_of: dict[tuple[int, ...], int] = {}
    tokens: list[torch.Tensor] = []
    parents: list[int] = []
    forwards = 0
    for depth in range(1, shape.depth + 1):
        level = [p for p in shape.paths if len(p) == depth]
        parent_paths = sorted({p[:-1] for p in level})
        frontier = [node_of[p] if p else -1 for p in parent_paths]
        k = max(p[-1] for p in level) + 1
        tree = DraftTree(torch.stack(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device),
                         list(parents))
        ids, _ = expander.expand(tree, frontier, depth, k)
        forwards += 1
        row_of = {p: row for row, p in enumerate(parent_paths)}
        for path in level:
            node_of[path] = len(parents)
            parents.append(node_of[path[:-1]] if len(path) > 1 else -1)
            tokens.append(ids[row_of[path[:-1]], path[-1]])
    return DraftTree(torch.stack(tokens), parents, forwards)


def _grow_by_confidence(depth: int, top_k: int, width: int, budget: int, expander: TreeExpander,
                        device) -> DraftTree:
    """Every depth expands the `width` most confident nodes of the previous one into `top_k` children; the `budget`
    most confident nodes overall are kept, each with its confidence (path log-probability) as its score."""
    tokens = torch.empty(0, dtype=torch.long, device=device)
    scores = torch.empty(0, device=device)
    parents: list[int] = []
    frontier = [-1]
    forwards = 0
    for level in range(1, depth + 1):
        ids, logp = expander.expand(DraftTree(tokens, list(parents)), frontier, level, top_k)
        forwards += 1
        base = torch.stack([scores[f] if f >= 0 else scores.new_zeros(()) for f in frontier])
        child_scores = (base[:, None] + logp.float()).reshape(-1)
        first = len(parents)
        parents += [f for f in frontier for _ in range(top_k)]
        tokens = torch.cat([tokens, ids.reshape(-1)])
        scores = torch.cat([scores, child_scores])
        # Ties broken by node order, as the final rerank does (torch.topk leaves their order unspecified).
        frontier = sorted(first + i for i in confidence_order(child_scores.tolist())[:width])
    kept = sorted(confidence_order(scores.tolist())[:budget])  # one sync, not one per node
    new_index = {old: new for new, old in enumerate(kept)}
    return DraftTree(tokens[kept], [new_index[parents[i]] if parents[i] >= 0 else -1 for i in kept], forwards,
                     scores[kept])


def confidence_order(scores: list[float]) -> list[int]:
    """Node ids from most to least confident, ties in node order. A child never outscores its parent (log-probabilities
    are <= 0) and parents precede children, so every parent comes before its children and any prefix of the order is
    a tree: keeping the best `b` nodes is pruning to a budget."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def confidence_ranks(tree: DraftTree, nodes: list[int], max_depth: int) -> list[list[int]]:
    """For each depth limit d = 1..max_depth: the confidence rank of each of `nodes` (ascending depth, as a path)
    among the tree's nodes of depth <= d, for those of `nodes` within that depth. Grown by confidence with `total_tokens`
    b, the same drafter with depth d and total_tokens b' <= b would keep exactly the nodes of depth <= d ranked < b'
    (growth of a depth never depends on deeper ones, and pruning keeps a prefix of the ranking)."""
    if tree.scores is None:
        raise ValueError("confidence ranks need a tree grown by confidence (DraftTree.scores is None)")
    depths = tree.depths
    order = confidence_order(tree.scores.tolist())
    wanted = set(nodes)
    ranks = []
    for limit in range(1, max_depth + 1):
        rank_of, rank = {}, 0
        for node in order:
            if depths[node] <= limit:
                if node in wanted:
                    rank_of[node] = rank
                rank += 1
        ranks.append([rank_of[n] for n in nodes if depths[n] <= limit])
    return ranks


def grow_tree(shape: TreeShape, expander: TreeExpander, device: torch.device | str = "cpu") -> DraftTree:
    """Build the tree `shape` describes, asking `expander` for the candidates depth by depth."""
    if isinstance(shape, StaticTree):
        return _grow_static(shape, expander, device)
    if isinstance(shape, TopKTree):
        return _grow_by_confidence(shape.depth, shape.top_k, shape.width, shape.budget, expander, device)
    if isinstance(shape, DynamicTree):
        return _grow_by_confidence(shape.depth, shape.top_k, shape.top_k, shape.total_tokens, expander, device)
    raise TypeError(f"unknown tree shape {type(shape).__name__}")


def tree_attention_mask(
    tree: DraftTree, cached: int, suffix: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask [1, 1, suffix + N, cached + suffix + N]: the suffix is causal, node i sees every committed token
    and its ancestors (itself included)."""
    n = tree.size
    queries, keys = suffix + n, cached + suffix + n
    allowed = torch.zeros(queries, keys, dtype=torch.bool)
    allowed[:suffix, : cached + suffix] = torch.ones(suffix, cached + suffix, dtype=torch.bool).tril(cached)
    for node in range(n):
        row = suffix + node
        allowed[row, : cached + suffix] = True
        for ancestor in tree.path_to(node):
            allowed[row, cached + suffix + ancestor] = True
    mask = torch.zeros(queries, keys, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.to(device)[None, None]


def keep_cache_path(cache: DynamicCache, committed: int, path_slots: list[int]) -> None:
    """Move the KV entries at `path_slots` (absolute positions, ascending) to positions committed, committed + 1, ...
    and drop everything after them."""
    if path_slots:
        length = len(path_slots)
        index = torch.tensor(path_slots, dtype=torch.long, device=cache.layers[0].keys.device)
        for layer in cache.layers:
            if layer.keys.device != index.device:  # a model split over devices
                index = index.to(layer.keys.device)
            layer.keys[:, :, committed : committed + length] = layer.keys.index_select(2, index)
            layer.values[:, :, committed : committed + length] = layer.values.index_select(2, index)
    excess = cache.get_seq_length() - committed - len(path_slots)
    if excess > 0:
        cache.crop(-excess)


def _target_tree_forward(target_model: nn.Module, cache: DynamicCache, sequence: torch.Tensor, tree: DraftTree):
    """One target pass over the uncached suffix and the tree. Returns (logits [N + 1, V] for the root and each node,
    post-norm hidden [S + N, H], pre-norm hidden [S + N, H])."""
    decoder = target_model.get_decoder()
    cached = cache.get_seq_length()
    suffix = sequence[:, cached:]
    s = suffix.shape[1]
    root_position = sequence.shape[1] - 1
    depths = torch.tensor(tree.depths, dtype=torch.long, device=sequence.device)
    positions = torch.cat([torch.arange(cached, cached + s, device=sequence.device), root_position + depths])
    feed = torch.cat([suffix, tree.tokens.view(1, -1).to(sequence.device)], dim=1)
    dtype = next(target_model.parameters()).dtype
    mask = tree_attention_mask(tree, cached, s, dtype, sequence.device)
    captured = {}
    handle = decoder.norm.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("prenorm", inputs[0]))
    try:
        body = decoder(input_ids=feed, attention_mask=mask, position_ids=positions[None], past_key_values=cache,
                       use_cache=True)
    finally:
        handle.remove()
    hidden = body.last_hidden_state[0]
    logits = target_model.get_output_embeddings()(hidden[s - 1:])
    return logits, hidden, captured["prenorm"][0]


def _accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Follow the target's argmax from the root. Returns (accepted node ids, argmax per row [N + 1] on host, tokens)."""
    host = torch.cat([logits.argmax(dim=-1), tree.tokens.to(logits.device)]).tolist()
    best, tokens = host[: tree.size + 1], host[tree.size + 1:]
    children: dict[int, dict[int, int]] = {}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, {}).setdefault(tokens[node], node)
    path, current = [], -1
    while (child := children.get(current, {}).get(best[current + 1])) is not None:
        path.append(child)
        current = child
    return path, best[current + 1], tokens


def _accept_sampling(tree: DraftTree, logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None) -> tuple[list[int], int, list[int]]:
    """Lossless speculative sampling over a tree of fixed candidates. Returns (accepted node ids, next token, tokens).

    Each candidate is a point-mass proposal. At a node its children are tried in tree order: child c is accepted with
    probability p'(c), p' being the target's distribution at that node with the tokens of the children already
    rejected removed and renormalised; an accepted child becomes the node, and when every child is rejected (or the
    node is a leaf) the next token is drawn from p'. Child j is then emitted with probability
    Π_{i<j} (1 - p'_i(c_i)) · p'_j(c_j) = p(c_j), and any other token with its own p: the output follows the target's
    distribution at `temperature` whatever the tree holds (multi-draft rejection sampling, as SpecInfer with
    deterministic drafts)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    device = logits.device
    if tree.size:
        parent_rows = torch.tensor(tree.parents, dtype=torch.long, device=device) + 1
        token_ids = tree.tokens.to(device)
        uniforms = torch.rand(tree.size, generator=generator, device=generator.device if generator else device)
        host = torch.cat([probs[parent_rows, token_ids].double(), uniforms.to(device).double(),
                          token_ids.double()]).tolist()  # one sync for the whole walk
        candidate_p, draws = host[: tree.size], host[tree.size: 2 * tree.size]
        tokens = [int(t) for t in host[2 * tree.size:]]
    else:
        candidate_p, draws, tokens = [], [], []
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(node)
    path, current = [], -1
    while True:
        rejected: list[int] = []
        removed = 0.0
        accepted = None
        for child in children.get(current, []):
            if tokens[child] in rejected:  # already removed from p': its probability there is 0
                continue
            remaining = 1.0 - removed
            if remaining > 0 and draws[child] * remaining < candidate_p[child]:
                accepted = child
                break
            rejected.append(tokens[child])
            removed += candidate_p[child]
        if accepted is None:
            break
        path.append(accepted)
        current = accepted
    residual = probs[current + 1]
    if rejected:
        residual = residual.index_fill(0, torch.tensor(rejected, device=device), 0.0)
        # Rejections leave mass elsewhere unless p sat entirely on the rejected tokens, up to rounding: then p itself.
        residual = torch.where(residual.sum() > 0, residual, probs[current + 1])
    next_token = int(torch.multinomial(residual, 1, generator=generator)[0])
    return path, next_token, tokens


def _accept_typical(
    tree: DraftTree, logits: torch.Tensor, temperature: float, threshold: float, alpha: float,
    generator: torch.Generator | None,
) -> tuple[list[int], int, list[int]]:
    """Medusa's typical acceptance (lossy). Returns (accepted node ids, next token, node tokens)."""
    if temperature == 0.0:
        path, best, tokens = _accept_greedy(tree, logits)
        return path, best, tokens
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    cutoff = torch.minimum(torch.full_like(entropy, threshold), alpha * torch.exp(-entropy))
    parent_rows = torch.tensor(tree.parents, dtype=torch.long, device=logits.device) + 1
    token_ids = tree.tokens.to(logits.device)
    token_probs = probs[parent_rows, token_ids] if tree.size else probs.new_zeros(0)
    passes = (token_probs > cutoff[parent_rows]).tolist() if tree.size else []
    log_p = token_probs.clamp_min(1e-12).log().tolist()
    ok: list[bool] = []
    score: list[float] = []
    for node, parent in enumerate(tree.parents):
        ok.append(passes[node] and (parent < 0 or ok[parent]))
        score.append(log_p[node] + (score[parent] if parent >= 0 else 0.0))
    depths = tree.depths
    accepted = [n for n in range(tree.size) if ok[n]]
    end = max(accepted, key=lambda n: (depths[n], score[n]), default=-1)
    path = tree.path_to(end) if end >= 0 else []
    next_token = int(torch.multinomial(probs[end + 1], 1, generator=generator)[0])
    return path, next_token, token_ids.tolist()


def tree_generate(
    target_model: nn.Module,
    drafter: TreeDrafter,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    acceptance: str = "greedy",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    eos_token_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    profile: bool = False,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after `input_ids` ([1, T]) with tree speculative decoding.

    `acceptance="greedy"` needs temperature 0 and reproduces the target's greedy output. `acceptance="sampling"` is
    lossless speculative sampling over the tree at `temperature` (the output follows the target's distribution; at 0
    it is greedy). `acceptance="typical"` is Medusa's lossy typical acceptance at `temperature` (at 0 it reduces to
    greedy). Stops after the first EOS (kept).
    `profile` times drafting and verification separately, as in speculative_generate.
    """
    _check_prompt(input_ids)
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}: choose one of {ACCEPTANCE}")
    if acceptance == "greedy" and temperature != 0.0:
        raise ValueError(
            f"acceptance='greedy' needs temperature 0; got {temperature}. Fix: acceptance='sampling' (lossless "
            "speculative sampling over the tree) or acceptance='typical' (Medusa's typical acceptance, lossy)")
    device = input_ids.device
    generator = _sampling_generator(temperature, device, generator)
    eos_ids = _eos_ids(eos_token_id)
    depth = drafter.max_depth
    stats = GenerationStats(proposed_per_position=[0] * depth, accepted_per_position=[0] * depth)
    timed = StepTimer(stats, device, profile)
    generated: list[int] = []
    fused_layers = getattr(drafter, "target_hidden", None)
    fused_layers = fused_layers if isinstance(fused_layers, tuple) else None  # post/pre-norm states come anyway
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), capture_target_hidden(target_model, fused_layers) as captured:
        drafter.reset()
        cache = new_cache()
        sequence = input_ids
        step: TargetStep | None = None
        while len(generated) < max_new_tokens:
            with timed("draft_time_s"):
                tree = drafter.propose_tree(step) if step is not None else DraftTree.empty(device)
            if tree.depth > depth:
                raise ValueError(f"drafter proposed a tree of depth {tree.depth} but declares max_depth={depth}")
            committed = cache.get_seq_length()
            with timed("verify_time_s"):
                logits, hidden, prenorm = _target_tree_forward(target_model, cache, sequence, tree)
            if acceptance == "greedy" or temperature == 0.0 and acceptance == "sampling":
                path, next_token, tokens = _accept_greedy(tree, logits)
            elif acceptance == "sampling":
                path, next_token, tokens = _accept_sampling(tree, logits, temperature, generator)
            else:
                path, next_token, tokens = _accept_typical(
                    tree, logits, temperature, posterior_threshold, posterior_alpha, generator)
            n = len(path)
            stats.accepted_nodes.extend([0] * (tree.size - len(stats.accepted_nodes)))
            for node in path:
                stats.accepted_nodes[node] += 1
            if tree.scores is not None and temperature == 0.0:
                stats.record_ranks(confidence_ranks(tree, path, depth))
            suffix = sequence.shape[1] - committed
            new_tokens, hit_eos = _cut_after_eos([tokens[i] for i in path] + [next_token], eos_ids)
            new_tokens = new_tokens[: max_new_tokens - len(generated)]

            stats.record_step(committed=len(new_tokens), accepted=n, reachable=tree.depth, drafted=tree.size,
                              draft_forwards=tree.forwards)

            generated.extend(new_tokens)
            if hit_eos or len(generated) >= max_new_tokens:
                break
            keep_cache_path(cache, committed + suffix, [committed + suffix + i for i in path])
            rows = torch.tensor(list(range(suffix)) + [suffix + i for i in path], device=hidden.device)
            accepted = torch.tensor([tokens[i] for i in path] + [next_token], dtype=torch.long, device=device)
            sequence = torch.cat([sequence, accepted.view(1, -1)], dim=1)
            aux = captured["hidden"][0].index_select(0, rows) if fused_layers is not None else None
            step = TargetStep(sequence=sequence, hidden=hidden.index_select(0, rows),
                              prenorm_hidden=prenorm.index_select(0, rows), start=committed, aux_hidden=aux)
    _synchronize(device)
    stats.wall_time_s = time.perf_counter() - start
    return GenerationOutput(tokens=generated, stats=stats)
