"""Clover-2: inputs and targets of each head (by hand), init from the target, augmenting-block KV cache, lossless
tree decoding, pinned tiny end-to-end losses and the draftkit export."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from draftkit.config import compose
from draftkit.drafts.clover import clover2
from draftkit.export.heads_dir import export_heads_dir, load_heads_dir
from draftkit.objectives.clover import clover_loss
from draftkit.recipes import clover as recipe
from draftkit.runtime.clover import CloverDrafter
from draftkit.runtime.speculative import autoregressive_generate
from draftkit.runtime.tree import tree_generate, tree_shape
from draftkit.targets.tiny import tiny_target
from test_runtime import sharpen


@pytest.fixture(scope="module")
def target():
    target = tiny_target(seed=0)
    sharpen(target.model, seed=0)
    return target


def build(target, **kw):
    decoder = target.model.get_decoder()
    return clover2(target.hidden_size, target_config=target.config, init_layer=decoder.layers[-1],
                   final_norm=decoder.norm, **kw)


def test_augmenting_block_starts_as_the_target_last_layer_and_norm(target):
    model = build(target, num_heads=2, num_layers=2)
    last = target.model.get_decoder().layers[-1].state_dict()
    for layer in model.augment.layers:
        for name, value in layer.state_dict().items():
            assert torch.equal(value, last[name]), name
    assert model.augment.layers[0].self_attn.q_proj.weight.data_ptr() != model.augment.layers[1].self_attn.q_proj.weight.data_ptr()
    assert torch.equal(model.norm.weight, target.model.get_decoder().norm.weight)


def test_head_i_at_t_reads_tokens_t_plus_1_to_t_plus_1_plus_i(target):
    torch.manual_seed(0)
    model = build(target, num_heads=3).eval()
    ids = torch.tensor([[5, 9, 14, 20, 33, 41]])
    hidden = torch.randn(1, 6, target.hidden_size)
    embed = target.lm_head.weight
    features = model(hidden, ids, embed)
    e = F.embedding(ids[0], embed)
    state0 = model.augmented(hidden, F.embedding(torch.cat([ids[:, 1:], ids[:, :1] * 0], 1), embed) * (
        torch.arange(6) < 5).float()[None, :, None])
    for t in range(3):
        torch.testing.assert_close(features[0, 0, t], model.head_output(0, state0[0, t], None))
        state = model.rnn(state0[0, t], e[t + 2])  # head 1 conditions on x_{t+2}
        torch.testing.assert_close(features[1, 0, t], model.head_output(1, state, e[t + 2]))
        state = model.rnn(state, e[t + 3])
        torch.testing.assert_close(features[2, 0, t], model.head_output(2, state, e[t + 3]))


def test_loss_scores_head_i_against_the_target_state_at_t_plus_1_plus_i():
    labels = torch.tensor([[-100, 1, 2, 3, 4]])
    target_features = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2)
    logits = torch.zeros(1, 5, 3)
    # Head 0 outputs exactly f_{t+1}: zero regression; head 1 outputs f_{t+1} where f_{t+2} was due: off by one.
    head0 = torch.cat([target_features[:, 1:], torch.zeros(1, 1, 2)], 1)
    out = clover_loss(torch.stack([head0, head0]), torch.zeros(2, 1, 5, 3), target_features, logits, labels,
                      feature_weight=1.0, token_weight=0.0, decay=1.0)
    assert out.metrics["smooth_l1_head0"].item() == 0.0
    assert out.metrics["smooth_l1_head1"].item() == pytest.approx(2 * 0.5)  # positions 0, 1: |diff| = 1 -> 0.5 each
    assert out.count.item() == 3


def test_augmenting_cache_step_by_step_equals_one_pass(target):
    from transformers import DynamicCache

    model = build(target, num_heads=2).eval()
    hidden, embeds = torch.randn(1, 6, target.hidden_size), torch.randn(1, 6, target.hidden_size)
    full = model.augmented(hidden, embeds)
    cache, parts = DynamicCache(), []
    for start, stop in ((0, 2), (2, 5), (5, 6)):
        parts.append(model.augmented(hidden[:, start:stop], embeds[:, start:stop], cache=cache, past_length=start))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["chain", "topk"])
def test_greedy_tree_decoding_with_clover_is_lossless(target, kind):
    model = build(target, num_heads=3).eval()
    drafter = CloverDrafter(model, target.lm_head.weight, target.lm_head.weight,
                            tree_shape(kind, 3, top_k=3, width=2, budget=7))
    prompt = torch.tensor([[1, 50, 60, 70, 80]])
    out = tree_generate(target.model, drafter, prompt, max_new_tokens=20)
    assert out.tokens == autoregressive_generate(target.model, prompt, max_new_tokens=20).tokens


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=clover", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return recipe.run(cfg, run_dir)


def test_tiny_run_has_pinned_losses_and_a_loadable_export(tmp_path, target):
    export = run_recipe(tmp_path)
    history = json.loads((tmp_path / "train" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([33.7373, 32.4175, 31.0390], abs=1e-4)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["after"]["chain"]["overall"]["outputs_differing_from_ar"] == 0
    info = json.loads((export / "draftkit.json").read_text())
    assert info["family"] == "clover" and info["architecture"] == {"num_heads": 4, "num_layers": 2,
                                                                    "num_attention_heads": None}
    loaded, _ = load_heads_dir(export, clover2, family="clover", hidden_size=target.hidden_size,
                               target_config=target.config)
    assert set(loaded.state_dict()) == set(json.loads((export / "manifest.json").read_text()))


def test_export_round_trip_is_exact(tmp_path, target):
    model = build(target, num_heads=2, num_layers=1)
    arch = {"num_heads": 2, "num_layers": 1, "num_attention_heads": None}
    out = export_heads_dir(model, tmp_path / "c", family="clover", architecture=arch, target_name="tiny",
                           hidden_size=target.hidden_size, vocab_size=target.vocab_size)
    loaded, _ = load_heads_dir(out, clover2, family="clover", hidden_size=target.hidden_size,
                               target_config=target.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_eval_cli_runs_clover_and_refuses_another_target(tmp_path, target, user_error):
    from draftkit.eval import main as eval_main

    model = build(target, num_heads=2, num_layers=1)
    arch = {"num_heads": 2, "num_layers": 1, "num_attention_heads": None}
    out = export_heads_dir(model, tmp_path / "c", family="clover", architecture=arch, target_name="tiny-h32",
                           hidden_size=target.hidden_size, vocab_size=target.vocab_size)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]}) + "\n")
    for name, hidden in (("same", target.hidden_size), ("other", 48)):
        directory = tmp_path / name
        other = tiny_target(hidden_size=hidden)
        other.model.save_pretrained(directory)
        other.tokenizer.save_pretrained(directory)
        args = ["--draft", str(out), "--target", str(directory), "--prompts", str(prompts), "--max-new-tokens", "6",
                "--no-progress", "--out", str(tmp_path / "eval")]
        if name == "same":
            assert eval_main(args) == 0
            assert json.loads((tmp_path / "eval" / "eval.json").read_text())["config"]["gamma"] == 2
        else:
            assert re.search("hidden_size=48.*trained for tiny-h32", user_error(eval_main, args))


def test_initial_weights_follow_engine_seed_not_the_random_state_before_the_run(tmp_path):
    def first_loss(name, torch_state_seed, engine_seed):
        torch.manual_seed(torch_state_seed)  # whatever a caller ran before the recipe
        run_recipe(tmp_path / name, f"engine.seed={engine_seed}", "engine.steps=1", "eval=none")
        return json.loads((tmp_path / name / "train" / "history.json").read_text())[0]["loss"]

    assert first_loss("a", 123, 0) == first_loss("b", 7, 0) == pytest.approx(33.7373, abs=1e-4)
