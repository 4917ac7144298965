"""Medusa artifacts: vLLM and FasterDecoding round trips, exact key sets, vLLM's config-key trap, manifests, and the
evaluation CLI refusing heads made for another target."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftkit.drafts.medusa import medusa_heads
from draftkit.eval import main as eval_main
from draftkit.export.artifact import ArtifactError
from draftkit.export.medusa import (
    check_vllm_config,
    export_medusa_fasterdecoding,
    export_medusa_vllm,
    load_medusa,
)

H, V = 8, 16


def trained_heads(lm_head: str, num_layers: int = 2):
    torch.manual_seed(0)
    heads = medusa_heads(H, V, num_heads=3, num_layers=num_layers, lm_head=lm_head, lm_head_weight=torch.randn(V, H))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    return heads


@pytest.mark.parametrize("lm_head", ["own", "shared"])
def test_vllm_round_trip_has_exactly_the_vllm_names_and_config(tmp_path, lm_head):
    heads = trained_heads(lm_head)
    target_lm_head = torch.randn(V, H)
    out = export_medusa_vllm(heads, tmp_path / "vllm", target_name="t", target_lm_head=target_lm_head, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config == {
        "model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": H, "vocab_size": V, "num_heads": 3,
        "num_hidden_layers": 2, "truncated_vocab_size": None, "original_lm_head": lm_head == "shared",
        "medusa_fc_bias": True, "torch_dtype": "float32",
    }
    names = set(load_file(str(out / "model.safetensors")))
    blocks = {f"blocks.{h}.layers.{l}.{p}" for h in range(3) for l in range(2) for p in ("weight", "bias")}
    heads_names = {"lm_heads.0.weight"} if lm_head == "shared" else {f"lm_heads.{h}.weight" for h in range(3)}
    assert names == blocks | heads_names
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) == names and manifest["blocks.0.layers.1.weight"]["shape"] == [H, H]
    assert json.loads((out / "draftkit.json").read_text())["family"] == "medusa"
    loaded = load_medusa(out)
    assert loaded.info["format"] == "vllm"
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.heads.state_dict().items()):
        assert torch.equal(a, b), name
    if lm_head == "shared":
        assert torch.equal(loaded.shared_lm_head, target_lm_head)


@pytest.mark.parametrize("lm_head", ["own", "shared"])
def test_fasterdecoding_round_trip_uses_the_legacy_names_in_both_files(tmp_path, lm_head):
    heads = trained_heads(lm_head)
    out = export_medusa_fasterdecoding(heads, tmp_path / "fd", target_name="t")
    config = json.loads((out / "config.json").read_text())
    assert config == {"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": "t",
                      "version": "1" if lm_head == "own" else "2"}
    names = set(load_file(str(out / "medusa_lm_head.safetensors")))
    assert names == set(torch.load(out / "medusa_lm_head.pt", weights_only=True))
    assert "0.1.linear.weight" in names and "2.1.linear.bias" in names
    assert ("0.2.weight" in names) == (lm_head == "own")
    hidden = torch.randn(4, H)
    shared = torch.randn(V, H)
    loaded = load_medusa(out).heads
    torch.testing.assert_close(loaded(hidden, shared), heads(hidden, shared))


def test_bf16_export_round_trips_at_bf16_precision(tmp_path):
    heads = trained_heads("own")
    out = export_medusa_vllm(heads, tmp_path / "v", target_name="t", target_lm_head=torch.randn(V, H))
    assert json.loads((out / "manifest.json").read_text())["lm_heads.0.weight"]["dtype"] == "bfloat16"
    loaded = load_medusa(out).heads
    assert torch.equal(loaded.blocks[1].layers[0].weight, heads.blocks[1].layers[0].weight.bfloat16().float())


@pytest.mark.parametrize("change", ["unknown", "missing"])
def test_a_changed_key_set_is_an_error_not_a_partial_load(tmp_path, change):
    out = export_medusa_vllm(trained_heads("own"), tmp_path / "v", target_name="t", target_lm_head=torch.randn(V, H))
    tensors = load_file(str(out / "model.safetensors"))
    if change == "unknown":
        tensors["blocks.0.layers.0.extra"] = torch.zeros(1)
    else:
        del tensors["blocks.2.layers.1.bias"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ArtifactError, match=change):
        load_medusa(out)


def test_vllm_config_keys_that_vllm_would_rename_are_refused():
    check_vllm_config({"num_heads": 4, "num_hidden_layers": 1, "hidden_size": 8})
    with pytest.raises(ArtifactError, match="num_attention_heads"):
        check_vllm_config({"num_heads": 4, "num_attention_heads": 9})
    with pytest.raises(ArtifactError, match="medusa_num_layers"):
        check_vllm_config({"num_hidden_layers": 1, "medusa_num_layers": 1})


def test_eval_cli_measures_a_heads_artifact_with_chain_and_tree(tmp_path, target_dir):
    directory, target = target_dir
    heads = medusa_heads(target.hidden_size, target.vocab_size, num_heads=2)
    out = export_medusa_vllm(heads, tmp_path / "v", target_name="tiny", target_lm_head=target.lm_head.weight)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]}) + "\n")
    for tree in ("chain", "topk"):
        assert eval_main(["--draft", str(out), "--target", str(directory), "--prompts", str(prompts), "--tree", tree,
                          "--max-new-tokens", "6", "--no-progress", "--out", str(tmp_path / tree)]) == 0
        report = json.loads((tmp_path / tree / "eval.json").read_text())
        assert report["config"]["decoding"] == "tree (greedy)" and len(report["overall"]["alpha"]) == 2
        assert report["overall"]["outputs_differing_from_ar"] == 0


@pytest.mark.parametrize("mismatch", ["hidden_size", "vocab_size"])
def test_heads_for_another_target_are_refused_with_the_fix(tmp_path, target_dir, mismatch, user_error):
    directory, target = target_dir
    hidden = target.hidden_size * (2 if mismatch == "hidden_size" else 1)
    vocab = target.vocab_size + (64 if mismatch == "vocab_size" else 0)
    heads = medusa_heads(hidden, vocab, num_heads=2)
    out = export_medusa_vllm(heads, tmp_path / "v", target_name="other-model", target_lm_head=torch.zeros(vocab, hidden))
    line = user_error(eval_main, ["--draft", str(out), "--target", str(directory), "--no-progress"])
    assert re.search(rf"{mismatch}=.*trained for other-model.*Fix: pass that model as --target", line)
