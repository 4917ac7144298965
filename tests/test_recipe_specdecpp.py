"""SpecDec++ recipe: labels, head training through the loop, policy, evaluation, export round trip, refusals, CLI."""

from __future__ import annotations

import copy
import json
import re
import shutil
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftkit.config import compose
from draftkit.data.specdecpp_labels import collate_labels, read_labels
from draftkit.drafts.lm import draft_from_target
from draftkit.drafts.specdecpp import acceptance_head, draft_fingerprint
from draftkit.engine.checkpoint import list_checkpoints, load_checkpoint
from draftkit.engine.loop import LoopSettings, train
from draftkit.eval import main as eval_main
from draftkit.export.artifact import ArtifactError
from draftkit.export.specdecpp import load_acceptance_head
from draftkit.recipes import specdecpp
from draftkit.targets.tiny import tiny_target

TINY = ["draft=from_target", "draft.num_layers=1", "target.num_layers=3", "specdecpp.labels.temperature=1.0"]


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=specdecpp", "+debug=tiny", f"hydra.run.dir={run_dir}", *TINY,
                   "specdecpp.policy.cost_ratio=0.25", *overrides])
    cfg.run_dir = str(run_dir)
    return specdecpp.run(cfg, run_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("specdecpp")
    return run_dir, run_recipe(run_dir)


def the_draft():
    """The recipe's draft for TINY: a one-layer cut of the three-layer tiny target."""
    target = tiny_target(num_layers=3)
    return target, draft_from_target(target.model, num_layers=1).eval()


def test_recipe_trains_the_head_with_pinned_losses_and_compares_fixed_and_adaptive(finished_run):
    run_dir, _ = finished_run
    history = json.loads((run_dir / "head" / "history.json").read_text())
    assert [h["loss"] for h in history] == pytest.approx([0.8699, 0.7520, 0.7871], abs=1e-4)
    assert all(0 < h["label_acceptance"] < 1 and 0 < h["predicted_acceptance"] < 1 for h in history)
    assert history[-1]["abs_error"] < history[0]["abs_error"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["before"]["config"]["gamma"] == 2 and result["after"]["overall"]["outputs_differing_from_ar"] == 0
    summary = (run_dir / "summary.md").read_text()
    assert "| draft, fixed γ=2 |" in summary and "| draft + head, threshold" in summary
    assert "Mean draft tokens per target forward" in summary and "mean abs error" in summary


def test_labels_are_soft_acceptances_with_mixed_positions_left_out(finished_run):
    run_dir, _ = finished_run
    examples = read_labels(sorted((run_dir / "specdecpp_labels" / "train").glob("shard_*.safetensors")))
    assert len(examples) == 4
    accept = torch.tensor([a for e in examples for a in e["accept"]])
    mask = torch.tensor([m for e in examples for m in e["loss_mask"]])
    assert ((accept >= 0) & (accept <= 1)).all() and 0 < accept.mean() < 1
    assert 0 < (~mask).sum() < len(mask)  # some positions kept the target's token and carry no loss
    heldout = read_labels(sorted((run_dir / "specdecpp_labels" / "heldout").glob("shard_*.safetensors")))
    assert len(heldout) == 2 and all(all(e["loss_mask"]) for e in heldout)  # held-out labels are not mixed


def test_labelled_examples_group_by_length_on_their_prompt_and_response_tokens(finished_run, tmp_path):
    run_dir, _ = finished_run
    examples = read_labels(sorted((run_dir / "specdecpp_labels" / "train").glob("shard_*.safetensors")))
    assert examples.lengths == [len(e["prompt_ids"]) + len(e["tokens"]) for e in examples]
    assert len(set(examples.lengths)) > 1  # the grouping has lengths to sort
    # budget=gpu30 groups every recipe's micro-batches by length
    run_recipe(tmp_path / "grouped", "engine.group_by_length=true")
    assert json.loads((tmp_path / "grouped" / "head" / "settings.json").read_text())["group_by_length"] is True


def test_training_lowers_the_loss(finished_run, tmp_path):
    run_dir, _ = finished_run
    _, draft = the_draft()
    examples = read_labels(sorted((run_dir / "specdecpp_labels" / "train").glob("shard_*.safetensors")))
    head = acceptance_head(draft.config.hidden_size, seed=3)
    result = train(model=head, step_fn=specdecpp.head_step(draft, 6.0), dataset=examples,
                   collate=partial(collate_labels, pad_token_id=2),
                   settings=LoopSettings(steps=10, micro_batch_size=4, lr=1e-2, warmup_steps=1, log_every=1),
                   stage_dir=tmp_path, resume=False, desc="head")
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.1


def test_export_round_trip_with_the_exact_key_set(finished_run, tmp_path):
    run_dir, export = finished_run
    _, draft = the_draft()
    head, info = load_acceptance_head(export / "acceptance_head", draft)
    # Recorded at export, equal to a fresh cut's: training left the draft untouched.
    assert info["family"] == "specdecpp" and info["draft_fingerprint"] == draft_fingerprint(draft)
    assert json.loads((export / "acceptance_head" / "config.json").read_text()) == {"hidden_size": 32, "num_layers": 3}
    trained, _ = load_checkpoint(list_checkpoints(run_dir / "head" / "checkpoints")[-1])
    trained = trained["model"]
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(tensor, trained[name])
    assert json.loads((export / "draftkit.json").read_text())["family"] == "specdecpp"
    policy = json.loads((export / "stop_policy.json").read_text())
    assert 1 <= policy["num_speculative_tokens"] <= 2 and 0 < policy["stop_threshold"] < 1
    assert json.loads((export / "generation_config.json").read_text())["num_assistant_tokens"] == \
        policy["num_speculative_tokens"]

    broken = tmp_path / "broken"
    shutil.copytree(export / "acceptance_head", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["blocks.3.linear.weight"] = tensors.pop("blocks.2.linear.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    renamed = r"missing \['blocks.2.linear.weight'\], unknown \['blocks.3.linear.weight'\]"
    with pytest.raises(ArtifactError, match=renamed):
        load_acceptance_head(broken)


def test_a_head_trained_for_another_draft_is_refused(finished_run, tmp_path, monkeypatch, user_error):
    _, export = finished_run
    _, draft = the_draft()
    other = copy.deepcopy(draft)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.01)  # same shapes, other weights
    with pytest.raises(ArtifactError, match="trained for another draft.*Fix: use the draft exported next to the head"):
        load_acceptance_head(export / "acceptance_head", other)
    # The eval CLI: a copy of the export whose draft was swapped for another one.
    swapped = tmp_path / "swapped"
    shutil.copytree(export, swapped)
    other.save_pretrained(swapped)
    monkeypatch.setattr("draftkit.eval.load_target", lambda *a, **k: tiny_target(num_layers=3))
    line = user_error(eval_main, ["--draft", str(swapped), "--no-progress"])
    assert re.search("^draftkit.eval: .*trained for another draft", line)
    # The recipe, given an existing head for another draft: refused before anything is labelled or trained.
    with pytest.raises(ArtifactError, match="trained for another draft"):
        run_recipe(tmp_path / "run", f"specdecpp.init_head={export / 'acceptance_head'}", "draft.num_layers=2")
    assert not (tmp_path / "run" / "specdecpp_labels").exists()


@pytest.mark.parametrize("override, message", [
    ("specdecpp.labels.mixing_fraction=1.0", r"mixing_fraction=1.0 must lie in \[0, 1\)"),
    ("specdecpp.labels.mixing_fraction=-0.1", r"mixing_fraction=-0.1 must lie in \[0, 1\)"),
    ("specdecpp.stop.threshold=1.5", r"threshold=1.5 must lie in \[0, 1\]"),
])
def test_bad_settings_are_one_clear_error_before_anything_runs(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_recipe(tmp_path, override)
    assert not (tmp_path / "config.yaml").exists()


def test_rerun_resumes_without_relabelling_or_retraining(finished_run):
    run_dir, export = finished_run
    shards = {p: p.stat().st_mtime_ns for p in (run_dir / "specdecpp_labels").rglob("shard_*.safetensors")}
    history = (run_dir / "head" / "history.json").read_text()
    head_weights = (export / "acceptance_head" / "model.safetensors").read_bytes()
    run_recipe(run_dir)
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    assert (run_dir / "head" / "history.json").read_text() == history
    assert (export / "acceptance_head" / "model.safetensors").read_bytes() == head_weights


def test_eval_cli_runs_the_head_or_the_static_policy(finished_run, tmp_path, monkeypatch):
    _, export = finished_run
    monkeypatch.setattr("draftkit.eval.load_target", lambda *a, **k: tiny_target(num_layers=3))
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Hi there"]}) + "\n")
    common = ["--draft", str(export), "--prompts", str(prompts), "--max-new-tokens", "8", "--no-progress"]
    assert eval_main([*common, "--out", str(tmp_path / "head")]) == 0
    report = json.loads((tmp_path / "head" / "eval.json").read_text())
    assert report["config"]["gamma"] == 2 and report["overall"]["outputs_differing_from_ar"] == 0
    assert eval_main([*common, "--no-head", "--out", str(tmp_path / "policy")]) == 0
    policy = json.loads((export / "stop_policy.json").read_text())
    assert json.loads((tmp_path / "policy" / "eval.json").read_text())["config"]["gamma"] == \
        policy["num_speculative_tokens"]
