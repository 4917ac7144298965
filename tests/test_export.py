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
