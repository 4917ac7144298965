"""Chain and tree drafting with a feature drafter (EAGLE-1 / FSPAD) in draftkit's speculative runtime; by default the
tree is EAGLE-2's dynamic tree (runtime.tree.DynamicTree), as EAGLE-2 and FSPAD decode.

The drafter keeps the target's features for the committed positions (handed over by the runtime after each target
forward) and a KV cache over its single layer. Draft position t holds (f_t, x_{t+1}); its output is the predicted
f_{t+1} and, through the LM head, the distribution of x_{t+2}. Within a proposal, predicted features (`regress`) stand
in for the target's; their KV entries are dropped at rollback, because the next round has the real features for
those positions. Before the first target forward there are no features, so the first proposal is empty: the first
verification is the prompt prefill and yields one token.

A drafter with a restricted draft vocabulary (`model.token_map`, drafts/vocab.py) proposes target ids all the same:
the chain samples from its distribution scattered onto the target's vocabulary (zero outside the draft vocabulary), so
speculative sampling compares like with like and stays lossless; the tree maps its top-k draft ids to target ids.
Tokens fed back into the draft are target ids, which its (full) embedding reads.
"""

from __future__ import annotations

import torch

from draftkit.drafts.fspad import FeatureDrafter, KVCache
from draftkit.drafts.vocab import full_vocab_logits, target_ids
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.speculative import DraftProposal, choose_token


def choose_target_token(model: FeatureDrafter, predict: torch.Tensor, temperature: float,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """choose_token over the draft's distribution on the target's vocabulary. Sampling needs that whole distribution
    (-inf at ids a restricted draft vocabulary lacks) to compare with the target's; greedy only needs the argmax, so it
    maps the draft id instead of building a vocabulary-sized tensor per drafted token."""
    logits = model.head_logits(predict)
    if model.token_map is None:
        return choose_token(logits, temperature, generator)
    if temperature == 0.0:
        return model.token_map[logits.argmax()], None
    return choose_token(full_vocab_logits(logits, model.token_map, model.vocab_size), temperature, generator)


class _ModuleModes:
    """measure_acceptance toggles train/eval on whatever it evaluates; a drafter forwards that to its module."""

    model: FeatureDrafter

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)


class FeatureChainDrafter(_ModuleModes):
    """A Drafter (runtime/speculative.py) for `FeatureDrafter` modules."""

    def __init__(self, model: FeatureDrafter, target_hidden: str = "post_norm", name: str | None = None):
        self.model = model
        self.target_hidden = target_hidden
        self.name = name or f"{model.variant} feature drafter"
        self.reset()

    def reset(self) -> None:
        self.features: torch.Tensor | None = None  # [1, N, H]: the target's features of positions 0..N-1
        self.cache: KVCache | None = None
        self.real_pairs = 0  # draft positions in the cache that were built from real target features

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        hidden = hidden.to(device=self.model.fc.weight.device, dtype=self.model.fc.weight.dtype)
        self.features = hidden if self.features is None else torch.cat([self.features, hidden], dim=1)

    def catch_up(self, sequence: torch.Tensor):
        """Feed the draft positions whose target features arrived since the last call. Returns the output of the newest
        position (predicting the first token after `sequence`), or None before any target feature exists."""
        if self.features is None or self.features.shape[1] == 0:
            return None
        count = self.features.shape[1]
        if sequence.shape[1] != count + 1:
            raise RuntimeError(f"feature drafter out of step: {count} target features for a sequence of "
                               f"{sequence.shape[1]} tokens (expected one feature fewer than tokens)")
        device = self.model.fc.weight.device
        ids = sequence[:, self.real_pairs + 1 : count + 1].to(device)
        out = self.model(self.features[:, self.real_pairs : count], ids, cache=self.cache)
        self.cache, self.real_pairs = out.cache, count
        return out

    def propose(
        self, sequence: torch.Tensor, num_tokens: int, temperature: float, generator: torch.Generator | None
    ) -> DraftProposal:
        device = self.model.fc.weight.device
        out = self.catch_up(sequence) if num_tokens > 0 else None
        if out is None:
            return DraftProposal(torch.empty(0, dtype=torch.long, device=device), None, 0)
        tokens, probs = [], []
        feature, predict, cache = out.regress[:, -1:], out.predict[:, -1], out.cache
        for position in range(num_tokens):
            token, prob = choose_target_token(self.model, predict[0], temperature, generator)
            tokens.append(token)
            probs.append(prob)
            if position < num_tokens - 1:
                step = self.model(feature, token.view(1, 1), cache=cache)
                feature, predict, cache = step.regress, step.predict[:, -1], step.cache
        self.cache = cache
        return DraftProposal(
            tokens=torch.stack(tokens),
            probs=None if temperature == 0.0 else torch.stack(probs),
            forwards=num_tokens,
        )

    def rollback(self, num_valid_tokens: int) -> None:
        # Positions drafted from predicted features are always dropped; the real ones never go stale.
        if self.cache is not None:
            self.cache = self.cache.truncated(self.real_pairs)
        if self.features is not None and self.features.shape[1] > num_valid_tokens:
            self.features = self.features[:, :num_valid_tokens]


class FeatureTreeDrafter(_ModuleModes):
    """A TreeDrafter (runtime/tree.py) for `FeatureDrafter` modules: one draft pass per tree depth.

    Each step crops the draft cache back to the step's `start`, feeds the new real features, then grows the tree:
    a node at depth d is fed (its parent's predicted feature, its token) at draft position L - 2 + d, attending to
    the real positions and to its own ancestors only. The tree's KV entries are dropped before the next step."""

    def __init__(self, model: FeatureDrafter, shape, target_hidden: str = "post_norm", name: str | None = None):
        from draftkit.runtime.tree import check_tree_fits_vocabulary

        check_tree_fits_vocabulary(shape, model.draft_vocab_size)
        self.model, self.shape, self.target_hidden = model, shape, target_hidden
        self.max_depth = shape.depth
        self.name = name or f"{model.variant} feature drafter (tree)"
        self.reset()

    def reset(self) -> None:
        self.cache: KVCache | None = None

    def propose_tree(self, step):
        from draftkit.runtime.tree import grow_tree

        device = self.model.fc.weight.device
        hidden = step.hidden if self.target_hidden == "post_norm" else step.prenorm_hidden
        hidden = hidden.to(device=device, dtype=self.model.fc.weight.dtype)[None]
        cache = self.cache.truncated(step.start) if self.cache is not None and step.start > 0 else None
        length = step.sequence.shape[1]
        ids = step.sequence[:, step.start + 1 : length].to(device)
        out = self.model(hidden, ids, cache=cache)
        self.cache = out.cache
        self._real = out.cache.length
        self._root_position = length - 2
        # Per fed node: the predicted feature its children read, its logits, its cache slot.
        self._feature = {-1: out.regress[0, -1]}
        self._logits = {-1: self.model.head_logits(out.predict[0, -1])}
        self._slot: dict[int, int] = {}
        self._tree_cache = out.cache
        return grow_tree(self.shape, self, device=step.sequence.device)

    def expand(self, tree, frontier: list[int], depth: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        new = [node for node in frontier if node >= 0 and node not in self._logits]
        if new:
            self._feed(tree, new)
        logits = torch.stack([self._logits[node] for node in frontier])
        top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return target_ids(top.indices, self.model.token_map), top.values

    def _feed(self, tree, nodes: list[int]) -> None:
        device = self.model.fc.weight.device
        depths = tree.depths
        features = torch.stack([self._feature[tree.parents[n]] for n in nodes])[None]
        tokens = tree.tokens[nodes].to(device).view(1, -1)
        positions = torch.tensor([[self._root_position + depths[n] for n in nodes]], device=device)
        past = self._tree_cache.length
        # Built on the host and moved once: element writes into a device tensor would each be a kernel launch.
        allowed = torch.zeros(len(nodes), past + len(nodes), dtype=torch.bool)
        allowed[:, : self._real] = True
        for row, node in enumerate(nodes):
            self._slot[node] = past + row
            for ancestor in tree.path_to(node):
                allowed[row, self._slot[ancestor]] = True
        out = self.model(features, tokens, positions=positions, attn_mask=allowed.to(device), cache=self._tree_cache)
        self._tree_cache = out.cache
        logits = self.model.head_logits(out.predict[0])  # one LM-head product for every fed node
        for row, node in enumerate(nodes):
            self._feature[node] = out.regress[0, row]
            self._logits[node] = logits[row]


def drafting(model: FeatureDrafter, target, options: DraftingOptions, feature_norm: str = "post_norm",
             name: str | None = None) -> Drafting:
    """By default a dynamic tree (runtime.tree.DynamicTree at EAGLE-2's depth 6, top-k 10, 59 tokens): how EAGLE-2
    and FSPAD decode, and the better use of EAGLE-1's weights too (EAGLE-2 reuses them). `options.tree == "chain"` is
    the chain drafter (greedy and lossless speculative sampling with the draft's own probabilities); static and topk
    trees as runtime.tree builds them. `feature_norm`: the target feature the model was trained on (post_norm or
    pre_norm), which an artifact records."""
    if options.kind("dynamic") == "chain":
        return Drafting(FeatureChainDrafter(model, feature_norm, name))
    return Drafting(FeatureTreeDrafter(model, options.shape(None, "dynamic"), feature_norm, name))
