"""EAGLE-3 on tiny targets: training-time test against a hand-written unroll, the objective's alignment, pinned losses,
online vs offline fused-layer features, lossless chain and tree drafting, the speculators and SGLang exports (key sets,
configs, speculators' own loader) and the recipe end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from draftkit.config import compose
from draftkit.data.feature_cache import FeatureExamples, build_feature_cache, collate_with_features, target_features
from draftkit.drafts.eagle3 import eagle3_drafter
from draftkit.export.eagle3 import export_eagle3, load_eagle3_drafter
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.eagle3 import step_weights, ttt_masks
from draftkit.recipes import eagle3
from draftkit.runtime.eagle3 import Eagle3ChainDrafter, Eagle3TreeDrafter
from draftkit.runtime.speculative import speculative_generate
from draftkit.runtime.tree import tree_generate, tree_shape
from draftkit.targets.tiny import tiny_target

LAYERS = [2, 4, 5]  # [2, L // 2, L - 3] of an 8-layer target
PROMPTS = (torch.tensor([[1]]), torch.tensor([[1, 50, 60, 70]]), torch.tensor([[1, 9, 8, 7, 6, 5, 4]]))


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=eagle3", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return eagle3.run(cfg, run_dir)


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "train" / "history.json").read_text())]


def deep_target(scale: float = 1.0):
    """An 8-layer tiny target with re-drawn weights (at the default init it only repeats its last token)."""
    target = tiny_target(num_layers=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in target.model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, scale / param.shape[1] ** 0.5, generator=generator)
    return target


def new_drafter(target, token_map=None, feature_sampling=False, partial_alignment=False):
    return eagle3_drafter(embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
                          norm_weight=target.model.get_decoder().norm.weight, num_aux_layers=len(LAYERS), num_heads=4,
                          num_kv_heads=2, intermediate_size=64, feature_sampling=feature_sampling,
                          partial_alignment=partial_alignment, token_map=token_map)


def trained_drafter(target, token_map=None, steps: int = 60):
    """A drafter trained briefly on the target's own greedy continuations: accepted often, rejected sometimes."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 300, (8, 3), generator=generator)
    with torch.no_grad():
        sequences = target.model.generate(prompts, do_sample=False, max_new_tokens=20, pad_token_id=0)
    labels = sequences.clone()
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": sequences, "labels": labels, "attention_mask": torch.ones_like(sequences)}
    features = target_features(target, sequences, None, aux_layers=LAYERS)
    draft = new_drafter(target, token_map).train()
    optimizer = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    draft.curve = []
    for _ in range(steps):
        out = eagle3.feature_step(draft, batch, features, steps=3, weights=[1.0, 0.8, 0.64], regression_weight=1.0)
        optimizer.zero_grad()
        (out.loss_sum / out.count).backward()
        optimizer.step()
        draft.curve.append((out.loss_sum / out.count).item())
    return draft.eval()


@pytest.fixture(scope="module")
def target():
    return deep_target()


@pytest.fixture(scope="module")
def trained(target):
    return trained_drafter(target)


# ---------------------------------------------------------------- training-time test and objective


@pytest.mark.parametrize("switches", [(False, False), (True, True)], ids=["eagle3", "fspad_options"])
def test_ttt_unroll_equals_a_hand_written_two_step_reference(switches):
    target = deep_target()
    draft = new_drafter(target, feature_sampling=switches[0], partial_alignment=switches[1]).eval()
    features = torch.randn(2, 7, 3 * 32)
    ids = torch.randint(0, 320, (2, 7))
    unrolled = draft.unroll(features, ids, 2)
    # By hand: step 0 is the plain causal forward; step 1 feeds its own fed-back states with the ids moved one left,
    # at positions t + 1, through the KV cache of step 0 with a mask of causal step-0 keys plus the own step-1 key.
    first = draft(features, ids)
    shifted = torch.cat([ids[:, 1:], ids.new_zeros(2, 1)], dim=1)
    mask = torch.cat([torch.ones(7, 7, dtype=torch.bool).tril(), torch.eye(7, dtype=torch.bool)], dim=1)
    second = draft(first.regress, shifted, positions=torch.arange(1, 8).expand(2, 7), attn_mask=mask, cache=first.cache)
    assert torch.allclose(unrolled[0][0], first.predict, atol=1e-5)
    assert torch.allclose(unrolled[1][0], second.predict, atol=1e-5)
    assert torch.allclose(unrolled[1][1], second.regress, atol=1e-5)
    assert not torch.allclose(unrolled[1][0], unrolled[0][0], atol=1e-3)


def test_ttt_step_equals_chain_drafting_from_every_root(trained, target):
    # Step j at position t is what a chain rooted at t drafts at depth j + 1 (real states up to t, then its own).
    sequence = torch.tensor([[1, 50, 60, 70, 80, 90, 91]])
    features = target_features(target, sequence, None, aux_layers=LAYERS)
    fused = features[..., : 3 * 32]
    steps = trained.unroll(fused[:, :-1], sequence[:, 1:], 3)
    for root in range(sequence.shape[1] - 3):
        out = trained(fused[:, : root + 1], sequence[:, 1: root + 2])
        state, predict, cache = out.regress[:, -1:], out.predict[:, -1:], out.cache
        for depth in range(3):
            assert torch.allclose(predict[0, -1], steps[depth][0][0, root], atol=1e-5), (root, depth)
            if depth == 2:
                break
            token = sequence[:, root + 2 + depth: root + 3 + depth]
            step = trained(state, token, cache=cache)
            state, predict, cache = step.regress, step.predict, step.cache


def test_training_lowers_every_step_loss(trained):
    # The soft CE includes the random target's own entropy (about 12 nats over three steps), which no draft removes.
    assert sum(trained.curve[-5:]) / 5 < sum(trained.curve[:5]) / 5 - 1.0


def test_ttt_masks_and_weights_by_hand():
    # Tokens x0..x5, the assistant said x3..x5. Step j at draft position t predicts x_{t+j+2}.
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [13, 14, 15]])
    masks = ttt_masks(labels, 3)
    assert masks[0].tolist() == [[False, True, True, True, False]]   # t=1..3 predict x3..x5
    assert masks[1].tolist() == [[True, True, True, False, False]]   # t=0..2 predict x3..x5 two ahead
    assert masks[2].tolist() == [[True, True, False, False, False]]
    assert step_weights(3, 0.8) == pytest.approx([1.0, 0.8, 0.64])
    with pytest.raises(ValueError, match="give 3 non-negative numbers"):
        step_weights(3, 0.8, [1.0, 0.5])


def test_loss_by_hand_on_a_batch(target):
    sequence = torch.tensor([[1, 50, 60, 70, 80, 90, 91, 92]])
    labels = sequence.clone()
    labels[:, :3] = IGNORE_INDEX
    batch = {"input_ids": sequence, "labels": labels}
    features = target_features(target, sequence, None, aux_layers=LAYERS)
    draft = new_drafter(target, token_map=torch.arange(0, 320, 2)).eval()
    out = eagle3.feature_step(draft, batch, features, steps=2, weights=[1.0, 0.5], regression_weight=1.0)
    chunked = eagle3.feature_step(draft, batch, features, steps=2, weights=[1.0, 0.5], regression_weight=1.0,
                                  loss_chunk_size=3)
    assert chunked.loss_sum.item() == pytest.approx(out.loss_sum.item(), rel=1e-6)
    with torch.no_grad():
        logits = target.model(sequence).logits[0]
        steps = draft.unroll(features[:, :-1, : 3 * 32], sequence[:, 1:], 2)
    total = 0.0
    for step, weight in enumerate([1.0, 0.5]):
        for t in range(7):
            if t + step + 2 < 8 and labels[0, t + step + 2] != IGNORE_INDEX:
                p = torch.softmax(logits[t + step + 1, ::2], -1)  # the target renormalised over the draft vocabulary
                log_q = torch.log_softmax(draft.head_logits(steps[step][0][0, t]), -1)
                total += weight * -(p * log_q).sum().item()
    assert out.loss_sum.item() == pytest.approx(total, rel=1e-5)
    assert out.count.item() == 5 and "top1_1" in out.metrics


# ---------------------------------------------------------------- recipe end to end


@pytest.fixture(scope="module")
def eagle3_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eagle3")
    return run_dir, run_recipe(run_dir, "eagle3.ttt.steps=3")


def test_pinned_losses(eagle3_run, tmp_path):
    assert losses(eagle3_run[0]) == pytest.approx(PINNED_EAGLE3, abs=1e-4)
    # The target's head, frozen: the same start (the trained head starts as its copy), then a slower descent.
    run_recipe(tmp_path / "frozen", "eagle3.ttt.steps=3", "eagle3.lm_head=frozen", "eval=none")
    assert losses(tmp_path / "frozen") == pytest.approx(PINNED_FROZEN_HEAD, abs=1e-4)
    run_recipe(tmp_path / "fspad", "eagle3.ttt.steps=3", "eagle3.feature_sampling=true",
               "eagle3.partial_alignment=true", "eval=none")
    assert losses(tmp_path / "fspad") == pytest.approx(PINNED_FSPAD_OPTIONS, abs=1e-4)


PINNED_EAGLE3 = [14.0916, 14.0834, 14.0781]
PINNED_FROZEN_HEAD = [14.0916, 14.0863, 14.0834]
PINNED_FSPAD_OPTIONS = [14.1551, 14.1311, 14.1245]


def test_offline_training_matches_online(eagle3_run, tmp_path):
    run_recipe(tmp_path, "eagle3.ttt.steps=3", "eagle3.features.source=offline", "eagle3.features.storage=fp32",
               "eagle3.features.shard_size=2", "eval=none")
    assert losses(tmp_path) == pytest.approx(losses(eagle3_run[0]), abs=1e-5)
    manifest = json.loads((tmp_path / "feature_cache" / "manifest.json").read_text())
    assert manifest["feature"] == {"norm": "post_norm", "layer": 2, "aux_layers": [0, 1, 2]}


def test_int8_cache_scales_each_fused_layer(tmp_path, target):
    generator = torch.Generator().manual_seed(3)
    examples = [{"input_ids": torch.randint(3, 250, (n,), generator=generator).tolist()} for n in (5, 9, 7)]
    exact = build_feature_cache(target, examples, tmp_path / "exact", storage="fp32", progress=False, aux_layers=LAYERS)
    packed = build_feature_cache(target, examples, tmp_path / "int8", storage="int8", progress=False, aux_layers=LAYERS)
    for index in range(len(examples)):
        for group in range(len(LAYERS) + 1):  # each layer within its own precision, however their magnitudes differ
            part = slice(group * 32, (group + 1) * 32)
            scale = exact[index][:, part].abs().amax(-1, keepdim=True)
            assert ((packed[index][:, part] - exact[index][:, part]).abs() / scale).max() < 1e-2
    assert packed.nbytes() < 0.4 * exact.nbytes()
    batch = collate_with_features([FeatureExamples([{**e, "labels": e["input_ids"]} for e in examples], exact)[i]
                                   for i in (1, 0)], pad_token_id=0)
    assert batch["features"].shape == (2, 9, 4 * 32)


def test_the_recipe_exports_and_eval_loads_the_artifact(eagle3_run, tmp_path):
    run_dir, export = eagle3_run
    info = json.loads((export / "draftkit.json").read_text())
    assert info["family"] == "eagle3" and info["aux_layers"] == [0, 1, 2] and info["runtime_exports"] == []
    assert "residual stream entering layers 1..1" in info["not_written"]["speculators"]
    target = tiny_target()
    module, _ = load_eagle3_drafter(export, embed_weight=target.embed_tokens.weight,
                                    lm_head_weight=target.lm_head.weight)
    reference = target.model.generate(PROMPTS[1], do_sample=False, max_new_tokens=12, pad_token_id=0)[0, 4:].tolist()
    out = speculative_generate(target.model, Eagle3ChainDrafter(module, info["aux_layers"]), PROMPTS[1], gamma=3,
                               max_new_tokens=12)
    assert out.tokens == reference
    tree = json.loads((run_dir / "eval_after_tree.json").read_text())
    assert tree["overall"]["outputs_differing_from_ar"] == 0


def test_the_draft_trains_its_own_head_while_the_teacher_reads_the_targets(eagle3_run):
    _, export = eagle3_run
    target = tiny_target()
    module, info = load_eagle3_drafter(export, embed_weight=target.embed_tokens.weight,
                                       lm_head_weight=target.lm_head.weight)
    assert info["architecture"]["lm_head_trained"] is True
    assert torch.equal(load_file(str(export / "model.safetensors"))["lm_head.weight"].float(), module.lm_head.weight)
    assert not torch.allclose(module.lm_head.weight, target.lm_head.weight)  # three steps moved it
    assert module.teacher_head_weight.data_ptr() == target.lm_head.weight.data_ptr()  # the target's own rows
    arch = info["architecture"]
    frozen = eagle3_drafter(embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight,
                            norm_weight=torch.ones(arch["hidden_size"]), num_aux_layers=len(arch["aux_layers"]),
                            num_heads=arch["num_attention_heads"], num_kv_heads=arch["num_key_value_heads"],
                            intermediate_size=arch["intermediate_size"])
    assert not frozen.lm_head_trained and frozen.teacher_head_weight is frozen.lm_head.weight
    # a bf16 target: the trained head is an fp32 master copy, the teacher reads the bf16 rows as they are
    half = target.lm_head.weight.detach().to(torch.bfloat16)
    trained = eagle3_drafter(embed_weight=target.embed_tokens.weight.detach().to(torch.bfloat16), lm_head_weight=half,
                             norm_weight=torch.ones(arch["hidden_size"]), num_aux_layers=len(arch["aux_layers"]),
                             num_heads=arch["num_attention_heads"], num_kv_heads=arch["num_key_value_heads"],
                             intermediate_size=arch["intermediate_size"], train_lm_head=True)
    assert trained.lm_head.weight.dtype == torch.float32 and torch.equal(trained.lm_head.weight, half.float())
    assert trained.teacher_head_weight.data_ptr() == half.data_ptr()
    assert "lm_head.weight" not in {n for n, p in frozen.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tree", [None, "chain"])  # None: the family's default, EAGLE-2's dynamic tree
def test_eval_cli_runs_the_recipe_export(eagle3_run, tmp_path, monkeypatch, tree):
    from draftkit import eval as eval_module
    from draftkit.eval import main as eval_main

    monkeypatch.setattr(eval_module, "load_target", lambda *a, **k: tiny_target())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hello there"]}) + "\n")
    extra = ["--tree", tree] if tree else []
    assert eval_main(["--draft", str(eagle3_run[1]), "--prompts", str(prompts), "--max-new-tokens", "8", "--gamma",
                      "3", "--out", str(tmp_path / "eval"), "--no-progress", *extra]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["overall"]["outputs_differing_from_ar"] == 0 and report["overall"]["new_tokens"] == 8
    assert report["config"]["decoding"].startswith("tree") == (tree != "chain")


def test_eval_cli_runs_the_runtime_folders(exported, target, tmp_path, monkeypatch):
    from draftkit import eval as eval_module
    from draftkit.eval import main as eval_main

    monkeypatch.setattr(eval_module, "load_target", lambda *a, **k: target)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hello there"]}) + "\n")
    for fmt, folder in exported[1].items():
        assert eval_main(["--draft", str(folder), "--prompts", str(prompts), "--max-new-tokens", "12", "--gamma", "3",
                          "--out", str(tmp_path / fmt), "--no-progress"]) == 0
        report = json.loads((tmp_path / fmt / "eval.json").read_text())
        assert report["overall"]["outputs_differing_from_ar"] == 0, fmt


def test_bad_settings_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"eagle3.aux_layers=\[2, 1\] gives \[2, 1\] .* Fix: set eagle3.aux_layers"):
        run_recipe(tmp_path / "a", "eagle3.aux_layers=[2,1]")
    with pytest.raises(ValueError, match="eagle3.draft_vocab_size=1000 is larger than the target's vocabulary"):
        run_recipe(tmp_path / "b", "eagle3.draft_vocab_size=1000")
    with pytest.raises(ValueError, match="asks for speculators, which cannot hold this draft: .*feature sampling"):
        run_recipe(tmp_path / "c", "target.num_layers=8", "eagle3.aux_layers=null", "eagle3.feature_sampling=true",
                   "eagle3.export.formats=[speculators]")
    with pytest.raises(ValueError, match=r"eagle3.ttt.steps=0"):
        run_recipe(tmp_path / "d", "eagle3.ttt.steps=0")
    # an upload whose config names a target by a path of this machine: refused before training, not after it
    with pytest.raises(ValueError, match=r"push_format=speculators would upload a config naming no target \(this "
                                         r"one is built in-process\).* Fix: eagle3.export.verifier=<the target's Hub"):
        run_recipe(tmp_path / "e", "push_to_hub=me/eagle3", "push_format=speculators")
    with pytest.raises(ValueError, match=r"naming the target '/models/smollm2', which only this machine can find"):
        run_recipe(tmp_path / "f", "push_to_hub=me/eagle3", "push_format=speculators",
                   "eagle3.export.verifier=/models/smollm2")
    assert not any((tmp_path / name / "train").exists() for name in "abcdef")
    named = compose(["+recipe=eagle3", "+debug=tiny", "push_to_hub=me/eagle3", "push_format=speculators",
                     "eagle3.export.verifier=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert eagle3.validate(named)  # the stages to run: nothing refused
    # a Hub id whose GGUF file is converted here: the export would name the converted folder, not the id
    gguf = compose(["+recipe=eagle3", "+debug=tiny", "push_to_hub=me/eagle3", "push_format=speculators", "target=hf",
                    "target.path=HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "target.gguf_file=model.gguf"])
    with pytest.raises(ValueError, match="which only this machine can find"):
        eagle3.validate(gguf)



def test_an_unknown_head_setting_is_one_error_naming_both_choices(tmp_path):
    with pytest.raises(ValueError, match=r"eagle3.lm_head='shared'. Fix: choose trained .* or frozen"):
        run_recipe(tmp_path, "eagle3.lm_head=shared")
    assert not (tmp_path / "train").exists()


# ---------------------------------------------------------------- runtime


@pytest.mark.parametrize("vocab", ["full", "draft_vocab"])
def test_greedy_chain_drafting_is_lossless(vocab, target, trained):
    token_map = torch.tensor(sorted(set(range(0, 320, 2)) | {1})) if vocab == "draft_vocab" else None
    module = trained_drafter(target, token_map) if token_map is not None else trained
    accepted_any = rejected_any = False
    for prompt in PROMPTS:
        reference = target.model.generate(prompt, do_sample=False, max_new_tokens=24, pad_token_id=0)
        for gamma in (1, 3, 5):
            out = speculative_generate(target.model, Eagle3ChainDrafter(module, LAYERS), prompt, gamma=gamma,
                                       max_new_tokens=24)
            assert out.tokens == reference[0, prompt.shape[1]:].tolist(), (gamma, prompt.tolist())
            accepted_any |= sum(out.stats.accepted_per_position) > 0
            rejected_any |= out.stats.draft_acceptance < 1.0
    assert accepted_any and rejected_any


class CheckedChain(Eagle3ChainDrafter):
    """Asserts that the fused states the runtime hands over are the target's, computed from scratch."""

    def __init__(self, model, target):
        super().__init__(model, LAYERS)
        self.target, self.checked = target, 0

    def propose(self, sequence, num_tokens, temperature, generator):
        if self.features is not None:
            expected = target_features(self.target, sequence[:, :-1], None, aux_layers=LAYERS)[..., : 3 * 32]
            assert torch.allclose(self.features, expected, atol=1e-5)
            self.checked += 1
        return super().propose(sequence, num_tokens, temperature, generator)


def test_the_runtime_hands_the_drafter_the_fused_target_layers(trained, target):
    drafter = CheckedChain(trained, target)
    out = speculative_generate(target.model, drafter, PROMPTS[1], gamma=3, max_new_tokens=20)
    assert drafter.checked >= 4 and out.stats.tau > 1.0


def test_speculative_sampling_with_eagle3_preserves_the_target_distribution():
    from test_runtime import chi_square_p_value, micro_lm

    model, vocab, temperature, runs = micro_lm(0, vocab_size=8), 8, 0.8, 600
    layers = (0, 1)  # the micro LM's embeddings and first layer
    draft = eagle3_drafter(embed_weight=model.get_input_embeddings().weight,
                           lm_head_weight=model.get_output_embeddings().weight,
                           norm_weight=model.get_decoder().norm.weight, num_aux_layers=2, num_heads=2, num_kv_heads=1,
                           intermediate_size=32, token_map=torch.tensor([0, 2, 3, 5, 6])).eval()
    prompt = torch.tensor([[3, 1, 4]])
    with torch.inference_mode():
        first = torch.softmax(model(prompt).logits[0, -1].double() / temperature, dim=-1)
        extended = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(vocab, 1)], dim=1)
        second = torch.softmax(model(extended).logits[:, -1].double() / temperature, dim=-1)
    counts = torch.zeros(vocab * vocab)
    accepted = 0
    for run in range(runs):
        out = speculative_generate(model, Eagle3ChainDrafter(draft, layers), prompt, gamma=2, max_new_tokens=3,
                                   temperature=temperature, generator=torch.Generator().manual_seed(run))
        counts[out.tokens[0] * vocab + out.tokens[1]] += 1
        accepted += sum(out.stats.accepted_per_position)
    assert 0.1 * runs < accepted  # the draft is used, not just the target's own samples
    assert chi_square_p_value(counts, (first[:, None] * second).flatten()) > 1e-4


@pytest.mark.parametrize("kind", ["chain", "static", "topk"])
def test_greedy_tree_drafting_is_lossless(kind, trained, target):
    accepted = 0
    for prompt in PROMPTS:
        reference = target.model.generate(prompt, do_sample=False, max_new_tokens=20, pad_token_id=0)
        drafter = Eagle3TreeDrafter(trained, tree_shape(kind, 3, top_k=3, width=2, budget=8), LAYERS)
        out = tree_generate(target.model, drafter, prompt, max_new_tokens=20)
        assert out.tokens == reference[0, prompt.shape[1]:].tolist(), (kind, prompt.tolist())
        accepted += sum(out.stats.accepted_per_position)
        if kind == "chain":  # a chain-shaped tree drafts exactly what the chain runtime drafts
            chain = speculative_generate(target.model, Eagle3ChainDrafter(trained, LAYERS), prompt, gamma=3,
                                         max_new_tokens=20)
            assert out.stats.accepted_lengths == chain.stats.accepted_lengths
    assert accepted > 0


# ---------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def exported(tmp_path_factory, target):
    folder = tmp_path_factory.mktemp("export")
    target.model.save_pretrained(folder / "target")
    target.tokenizer.save_pretrained(folder / "target")
    token_map = torch.tensor(sorted(set(range(0, 320, 3)) | {1, 2}))
    draft = trained_drafter(target, token_map, steps=30)
    exports = export_eagle3(draft, folder / "export", aux_layers=LAYERS, target_name="tiny-8", num_target_layers=8,
                            max_position_embeddings=512, num_speculative_tokens=3, resolved_config_yaml="",
                            verifier_name_or_path=str(folder / "target"), verifier_architectures=["LlamaForCausalLM"])
    return draft, exports, folder / "target"


def layer_keys(prefix):
    return {f"{prefix}self_attn.{p}_proj.weight" for p in "qkvo"} | {
        f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")} | {
        f"{prefix}{n}.weight" for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")}


def test_export_key_sets_and_configs(exported):
    draft, exports, target_dir = exported
    speculators = load_file(str(exports["speculators"] / "model.safetensors"))
    sglang = load_file(str(exports["sglang"] / "model.safetensors"))
    shared = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    assert set(speculators) == layer_keys("layers.0.") | shared | {"embed_tokens.weight"}
    assert set(sglang) == layer_keys("midlayer.") | shared
    assert speculators["fc.weight"].shape == (32, 96) and speculators["layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    token_map = draft.token_map
    assert speculators["lm_head.weight"].shape == (token_map.numel(), 32)
    assert speculators["d2t"].dtype == torch.int64 and torch.equal(speculators["d2t"] + torch.arange(token_map.numel()),
                                                                  token_map)
    assert speculators["t2d"].dtype == torch.bool and speculators["t2d"].sum() == token_map.numel()
    assert speculators["fc.weight"].dtype == torch.bfloat16
    config = json.loads((exports["speculators"] / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    assert config["norm_before_residual"] is False  # vLLM's speculators path would default it to True
    assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS and config["draft_vocab_size"] == token_map.numel()
    assert config["speculators_config"] == {
        "algorithm": "eagle3",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1,
                              "accept_tolerance": 0.0}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": str(target_dir), "architectures": ["LlamaForCausalLM"]}}
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and layer["vocab_size"] == 320
    sg = json.loads((exports["sglang"] / "config.json").read_text())
    assert sg["architectures"] == ["LlamaForCausalLMEagle3"] and sg["tie_word_embeddings"] is False
    assert sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # SGLang captures id + 1
    assert sg["eagle_aux_hidden_state_layer_ids"] == LAYERS and "bias" not in sg
    for folder in exports.values():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest) == set(load_file(str(folder / "model.safetensors")))


def test_every_format_loads_and_drafts_the_same(exported, target):
    _, exports, _ = exported
    runs = []
    for folder in exports.values():
        module, info = load_eagle3_drafter(folder, embed_weight=target.embed_tokens.weight,
                                           lm_head_weight=target.lm_head.weight)
        out = speculative_generate(target.model, Eagle3ChainDrafter(module, info["aux_layers"]), PROMPTS[1], gamma=3,
                                   max_new_tokens=16)
        runs.append(out.stats.accepted_lengths)
    assert runs[0] == runs[1] == runs[2] and max(runs[0]) > 1


def test_tampered_export_is_refused(exported, tmp_path, target):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "sglang"
    shutil.copytree(exported[1]["sglang"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["layers.0.hidden_norm.weight"] = tensors.pop("midlayer.hidden_norm.weight")
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['midlayer.hidden_norm.weight'\], unknown \['layers.0.hidden_norm"):
        load_eagle3_drafter(folder, embed_weight=target.embed_tokens.weight, lm_head_weight=target.lm_head.weight)


SPECULATORS_SCRIPT = """
import json, sys, torch
from speculators import SpeculatorModel, SpeculatorModelConfig
folder, inputs, out = sys.argv[1:4]
config = SpeculatorModelConfig.from_pretrained(folder)
config.transformer_layer_config._attn_implementation = "eager"  # flex attention needs a compiler on CPU
model = SpeculatorModel.from_pretrained(folder, config=config, dtype=torch.float32).eval()
data = torch.load(inputs)
logits = []
model.lm_head.register_forward_hook(lambda _m, _i, output: logits.append(output[0].tolist()))
with torch.no_grad():
    tokens = model(hidden_states=data["hidden"], input_ids=data["input_ids"],
                   document_ids=torch.zeros_like(data["input_ids"]), ttt_steps=3)
json.dump({"class": type(model).__name__, "tokens": [t[0].tolist() for t in tokens], "logits": logits,
           "d2t": model.d2t.tolist(), "fc": model.fc.weight.tolist()}, open(out, "w"))
"""


def speculators_python() -> str | None:
    """An interpreter with speculators installed: this one, or $DRAFTKIT_SPECULATORS_PYTHON (its pins on transformers
    and datasets clash with draftkit's, so it usually lives in a venv of its own)."""
    if importlib.util.find_spec("speculators") is not None:
        return sys.executable
    return os.environ.get("DRAFTKIT_SPECULATORS_PYTHON") or None


def test_speculators_loads_the_export(exported, target, tmp_path):
    python = speculators_python()
    if python is None:
        pytest.skip("speculators is not installed (pip install speculators, or point DRAFTKIT_SPECULATORS_PYTHON at "
                    "a venv that has it)")
    _, exports, _ = exported
    module, _ = load_eagle3_drafter(exports["speculators"], embed_weight=target.embed_tokens.weight,
                                    lm_head_weight=target.lm_head.weight)
    sequence = torch.tensor([[1, 50, 60, 70, 80, 90, 91, 92, 93, 94, 95, 96]])
    fused = target_features(target, sequence, None, aux_layers=LAYERS)[..., : 3 * 32]
    with torch.no_grad():
        steps = module.unroll(fused[:, :-1], sequence[:, 1:], 3)
        ours = torch.stack([module.head_logits(predict)[0] for predict, _ in steps])
    torch.save({"hidden": fused[:, :-1].contiguous(), "input_ids": sequence[:, 1:].contiguous()}, tmp_path / "in.pt")
    subprocess.run([python, "-c", SPECULATORS_SCRIPT, str(exports["speculators"]), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.json")], check=True, capture_output=True, timeout=300)
    theirs = json.loads((tmp_path / "out.json").read_text())
    assert theirs["class"] == "Eagle3DraftModel"
    assert torch.equal(torch.tensor(theirs["d2t"]) + torch.arange(module.draft_vocab_size), module.token_map)
    assert torch.allclose(torch.tensor(theirs["fc"]), module.fc.weight, atol=0)
    # Their training-time test over our weights scores what ours does, step for step (the argmax is compared where it
    # is not a near-tie).
    assert torch.allclose(torch.tensor(theirs["logits"]), ours, atol=1e-4)
    top = ours.topk(2, dim=-1).values
    clear = (top[..., 0] - top[..., 1]) > 1e-3
    assert torch.equal(torch.tensor(theirs["tokens"])[clear], ours.argmax(-1)[clear]) and clear.sum() > 20


def test_two_ranks_train_eagle3_through_the_ddp_wrapper(tmp_path):
    """The tiny recipe on 2 ranks: the training-time test runs through DDP's forward (its gradient hooks), the ranks
    stay in step and rank 0 exports."""
    from test_distributed import _torchrun

    run_dir = tmp_path / "run"
    _torchrun("-m", "draftkit.train", "+recipe=eagle3", "+debug=tiny", "eval=none", "eagle3.ttt.steps=2",
              f"hydra.run.dir={run_dir}")
    state = json.loads((run_dir / "train" / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2
    assert len(losses(run_dir)) == 3 and (run_dir / "export" / "draftkit.json").is_file()
