"""Hydra / Hydra++: which embeddings and teacher each head sees (by hand), untied blocks, prefix-layer KV cache,
lossless tree decoding, pinned tiny end-to-end losses, the draftkit export and bad input."""

import json
import re

import pytest
import torch

from draftkit.config import compose
from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.eval import main as eval_main
from draftkit.export.artifact import ArtifactError
from draftkit.export.heads_dir import export_heads_dir, load_heads_dir
from draftkit.objectives.hydra_heads import hydra_loss, rows_ahead_for_heads
from draftkit.recipes import hydra_heads as recipe
from draftkit.runtime.hydra_heads import HydraDrafter
from draftkit.runtime.speculative import autoregressive_generate
from draftkit.runtime.tree import tree_generate, tree_shape
from draftkit.targets.tiny import tiny_target
from test_runtime import sharpen


@pytest.fixture(scope="module")
def target():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    return target


def randomized(heads, seed=0, std=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return heads.eval()


def test_teacher_for_head_i_at_t_is_the_target_distribution_at_t_plus_1_plus_i():
    logits = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 3)  # row t holds the value t
    teachers = rows_ahead_for_heads(logits, num_heads=2)
    assert teachers[0, 0, :, 0].tolist() == [1, 2, 3, 4, 0]
    assert teachers[1, 0, :, 0].tolist() == [2, 3, 4, 0, 0]


def test_head_i_at_t_reads_h_t_and_the_embeddings_of_tokens_t_plus_1_to_t_plus_1_plus_i(target):
    heads = randomized(hydra_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2))
    ids = torch.tensor([[5, 9, 14, 20, 33, 41]])
    hidden = torch.randn(1, 6, target.hidden_size)
    lm = target.lm_head.weight
    logits = heads(hidden, ids, target.embed_tokens, lm)
    embed = target.embed_tokens
    for i in range(3):
        for t in range(6 - 1 - i):
            expected = heads.head_logits(i, hidden[0, t], embed(ids[0, t + 1 : t + 2 + i]), lm)
            torch.testing.assert_close(logits[i, 0, t], expected)


def test_blocks_are_untied_and_a_fresh_head_is_the_target_lm_head(target):
    heads = hydra_heads(target.hidden_size, target.vocab_size, num_heads=2, num_layers=3)
    layers = [layer for stack in heads.rest for layer in stack.layers]
    assert len(layers) == 4 and len({id(layer.weight) for layer in layers}) == 4
    hidden = torch.randn(1, 4, target.hidden_size)
    logits = heads(hidden, torch.tensor([[3, 4, 5, 6]]), target.embed_tokens, target.lm_head.weight)
    torch.testing.assert_close(logits[1], target.lm_head(hidden))


def test_hydra_loss_combines_hard_and_teacher_terms():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, 1, 2, 3, 0]])
    head_logits, target_logits = torch.randn(2, 1, 5, 4), torch.randn(1, 5, 4)
    hard = hydra_loss(head_logits, labels, lm_weight=1.0)
    soft = hydra_loss(head_logits, labels, target_logits, lm_weight=0.0, teacher_weight=1.0)
    both = hydra_loss(head_logits, labels, target_logits, lm_weight=0.5, teacher_weight=2.0)
    assert both.loss_sum.item() == pytest.approx(0.5 * hard.loss_sum.item() + 2.0 * soft.loss_sum.item(), rel=1e-5)
    assert hard.count.item() == 3
    with pytest.raises(ValueError, match="not both 0"):
        hydra_loss(head_logits, labels, lm_weight=0.0)


def test_prefix_layer_cache_fed_step_by_step_equals_one_causal_pass(target):
    heads = randomized(hydra_heads(target.hidden_size, target.vocab_size, num_heads=2, prefix_layer=True,
                                   target_config=target.config))
    hidden = torch.randn(1, 7, target.hidden_size)
    full = heads.prefix(hidden)
    from transformers import DynamicCache

    cache, pieces, start = DynamicCache(), [], 0
    for stop in (3, 4, 7):
        pieces.append(heads.prefix(hidden[:, start:stop], cache=cache, past_length=start))
        start = stop
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix_layer", [False, True])
@pytest.mark.parametrize("kind", ["chain", "static", "topk"])
def test_greedy_tree_decoding_with_hydra_heads_is_lossless(target, prefix_layer, kind):
    heads = randomized(hydra_heads(target.hidden_size, target.vocab_size, num_heads=3, num_layers=2,
                                   prefix_layer=prefix_layer, target_config=target.config), std=0.3)
    drafter = HydraDrafter(heads, target.embed_tokens, tree_shape(kind, 3, top_k=3, width=2, budget=7),
                           shared_lm_head=target.lm_head.weight)
    prompt = torch.tensor([[1, 50, 60, 70, 80]])
    out = tree_generate(target.model, drafter, prompt, max_new_tokens=20)
    assert out.tokens == autoregressive_generate(target.model, prompt, max_new_tokens=20).tokens


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=hydra_heads", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return recipe.run(cfg, run_dir)


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "train" / "history.json").read_text())]


def test_hydra_tiny_run_has_pinned_losses_and_exports(tmp_path, target):
    export = run_recipe(tmp_path)
    assert losses(tmp_path) == pytest.approx([21.4723, 21.4081, 21.3559], abs=1e-4)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["after"]["tree"]["overall"]["outputs_differing_from_ar"] == 0
    info = json.loads((export / "draftkit.json").read_text())
    assert info["family"] == "hydra_heads" and info["architecture"]["num_heads"] == 4
    assert set(json.loads((export / "manifest.json").read_text())) >= {"first.0.linear.weight", "first.3.res_connection.bias"}


def test_hydra_plus_plus_tiny_run_has_pinned_losses(tmp_path):
    run_recipe(tmp_path, "hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0", "hydra_heads.heads.prefix_layer=true",
               "hydra_heads.heads.num_layers=2", "eval=none")
    # Soft CE includes the teacher's entropy, so it sits above the hard-label loss; it still goes down.
    assert losses(tmp_path) == pytest.approx([23.0553, 23.0550, 23.0545], abs=1e-4)


def test_export_round_trip_key_checks_and_target_mismatch(tmp_path, target, user_error):
    arch = {"num_heads": 2, "num_layers": 2, "lm_head": "own", "prefix_layer": True, "dropout": 0.0}
    build = dict(hidden_size=target.hidden_size, vocab_size=target.vocab_size, target_config=target.config,
                 lm_head_weight=target.lm_head.weight)
    heads = randomized(hydra_heads(**arch, **build))
    out = export_heads_dir(heads, tmp_path / "h", family="hydra_heads", architecture=arch, target_name="tiny",
                           hidden_size=target.hidden_size, vocab_size=target.vocab_size)
    loaded, _ = load_heads_dir(out, hydra_heads, family="hydra_heads", **build)
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "model.safetensors"))
    tensors["first.9.linear.weight"] = torch.zeros(1)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ArtifactError, match=r"unknown \['first.9.linear.weight'\]"):
        load_heads_dir(out, hydra_heads, family="hydra_heads", **build)

    directory = tmp_path / "target"
    other = tiny_target(hidden_size=48)
    other.model.save_pretrained(directory)
    other.tokenizer.save_pretrained(directory)
    out = export_heads_dir(heads, tmp_path / "h2", family="hydra_heads", architecture=arch, target_name="tiny-h32",
                           hidden_size=target.hidden_size, vocab_size=target.vocab_size)
    line = user_error(eval_main, ["--draft", str(out), "--target", str(directory), "--no-progress"])
    assert re.search("hidden_size=48.*trained for tiny-h32", line)


def test_hydra_plus_plus_prefix_layer_follows_engine_seed_not_the_random_state_before_the_run(tmp_path):
    # The prefix layer is the randomly initialised part; it starts as the identity (o_proj and down_proj at zero), so its
    # random weights show in the loss from the second step on.
    def history(name, torch_state_seed):
        torch.manual_seed(torch_state_seed)  # whatever a caller ran before the recipe
        run_recipe(tmp_path / name, "hydra_heads.heads.prefix_layer=true", "eval=none")
        return losses(tmp_path / name)

    assert history("a", 123) == history("b", 7)
