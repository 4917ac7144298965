"""Medusa: head alignment by hand, untied blocks, pinned tiny end-to-end losses, Medusa-2, exports and bad input."""

import json

import pytest
import torch

from draftkit.config import compose
from draftkit.drafts.medusa import medusa_heads
from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.medusa import head_targets, medusa_loss
from draftkit.recipes import medusa

I = IGNORE_INDEX


def run_recipe(run_dir, *overrides):
    cfg = compose(["+recipe=medusa", "+debug=tiny", f"hydra.run.dir={run_dir}", *overrides])
    cfg.run_dir = str(run_dir)
    return medusa.run(cfg, run_dir)


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "train" / "history.json").read_text())]


def test_head_k_at_position_t_is_scored_against_the_token_k_plus_2_ahead():
    # Tokens 10..15; position 0 is a prompt token (no label).
    labels = torch.tensor([[I, 11, 12, 13, 14, 15]])
    targets = head_targets(labels, num_heads=3)
    # Head 0 at t predicts x_{t+2}: at t=0 the token 12, at t=3 the token 15, nothing after.
    assert targets[0, 0].tolist() == [12, 13, 14, 15, I, I]
    assert targets[1, 0].tolist() == [13, 14, 15, I, I, I]
    assert targets[2, 0].tolist() == [14, 15, I, I, I, I]


def test_medusa_loss_weights_heads_by_decay_and_counts_head0_positions():
    torch.manual_seed(0)
    labels = torch.tensor([[I, 1, 2, 3, 0, 1]])
    logits = torch.randn(2, 1, 6, 4)
    out = medusa_loss(logits, labels, decay=0.5)
    targets = head_targets(labels, 2)
    per_head = [torch.nn.functional.cross_entropy(logits[k, 0], targets[k, 0], ignore_index=I, reduction="sum")
                for k in range(2)]
    assert out.loss_sum.item() == pytest.approx(0.5 * per_head[0].item() + 0.25 * per_head[1].item(), rel=1e-6)
    assert out.count.item() == 4  # head 0 is scored at t = 0..3
    assert out.metrics["loss_head1"].item() == pytest.approx(per_head[1].item(), rel=1e-6)


def test_every_residual_block_has_its_own_weights_and_starts_as_identity():
    heads = medusa_heads(8, 16, num_heads=2, num_layers=3, lm_head="own", lm_head_weight=torch.randn(16, 8))
    layers = [layer for block in heads.blocks for layer in block.layers]
    assert len({id(layer.weight) for layer in layers}) == 6
    hidden = torch.randn(5, 8)
    assert torch.equal(heads.head_states(hidden)[1], hidden)  # W1 = 0: each head starts as the identity
    with torch.no_grad():
        heads.blocks[0].layers[0].weight.fill_(1.0)
    assert heads.blocks[0].layers[1].weight.abs().sum() == 0  # writing one layer leaves the others alone
    assert torch.equal(heads.lm_heads[0].weight, heads.lm_heads[1].weight)  # both start as the target's LM head
    assert heads.lm_heads[0].weight.data_ptr() != heads.lm_heads[1].weight.data_ptr()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("medusa")
    export = run_recipe(run_dir)
    return run_dir, export


def test_tiny_end_to_end_run_has_pinned_losses_and_reports_chain_and_tree(finished_run):
    run_dir, _ = finished_run
    assert losses(run_dir) == pytest.approx([12.6566, 12.6410, 12.6328], abs=1e-4)
    result = json.loads((run_dir / "result.json").read_text())
    for name in ("chain", "tree"):
        assert len(result["after"][name]["overall"]["alpha"]) == 4
        assert result["after"][name]["overall"]["outputs_differing_from_ar"] == 0
    assert "after, tree" in (run_dir / "summary.md").read_text()


def test_rerun_resumes_without_retraining(finished_run):
    run_dir, export = finished_run
    history = (run_dir / "train" / "history.json").read_text()
    weights = (export / "vllm" / "model.safetensors").read_bytes()
    run_recipe(run_dir)
    assert (run_dir / "train" / "history.json").read_text() == history
    assert (export / "vllm" / "model.safetensors").read_bytes() == weights


def test_medusa2_trains_lora_and_heads_with_separate_lrs(tmp_path):
    export = run_recipe(tmp_path, "medusa.joint=true", "medusa.joint_settings.target_loss=kl", "eval=none",
                        "medusa.joint_settings.lora.target_modules=[q_proj,v_proj]")
    # KL to the original target starts at 0 (LoRA B = 0), so the first loss is 0.2 x the heads' loss.
    assert losses(tmp_path) == pytest.approx([2.5313, 2.5197, 2.5093], abs=1e-4)
    assert (export / "target_lora" / "adapter_config.json").is_file()
    assert json.loads((export / "vllm" / "draftkit.json").read_text())["joint"] is True


def test_medusa2_heads_train_at_a_multiple_of_the_lora_lr():
    from draftkit.drafts.medusa import MedusaWithTarget
    from draftkit.engine.loop import LoopSettings, _param_groups
    from draftkit.recipes.medusa import _with_lora
    from draftkit.targets.tiny import tiny_target
    from omegaconf import OmegaConf

    target = tiny_target()
    lora = OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]})
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2)
    model = MedusaWithTarget(_with_lora(target.model, lora), heads, heads_lr_multiplier=4.0)
    groups = _param_groups(model, LoopSettings(lr=1e-3))
    head_params = {id(p) for p in heads.parameters()}
    lrs = {("heads" if id(p) in head_params else "lora"): g["lr"] for g in groups for p in g["params"]}
    assert lrs == {"heads": pytest.approx(4e-3), "lora": pytest.approx(1e-3)}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("heads.")]
    assert trainable and all("lora_" in n for n in trainable)  # the target's own weights stay frozen


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="target_loss='mse'"):
        run_recipe(tmp_path, "medusa.joint=true", "medusa.joint_settings.target_loss=mse")
    with pytest.raises(ValueError, match="bias=false cannot be exported"):
        run_recipe(tmp_path, "medusa.heads.bias=false")
    assert not (tmp_path / "train").exists()


def test_labels_from_the_data_skip_self_distillation(tmp_path, chats_with_replies):
    run_recipe(tmp_path / "run", "medusa.labels=data", f"data.prompts=[{chats_with_replies}]", "eval=none")
    assert len(losses(tmp_path / "run")) == 3
    assert not (tmp_path / "run" / "selfdistill.jsonl").exists()
    with pytest.raises(ValueError, match="labels='gold'"):
        run_recipe(tmp_path / "bad", "medusa.labels=gold")
