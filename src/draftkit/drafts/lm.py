"""Standalone draft language models (FastDraft, DistillSpec): small causal LMs sharing the target's vocabulary."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def llama_draft(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 768,
    max_position_embeddings: int = 2048,
    rope_theta: float = 100000.0,
    tie_word_embeddings: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A freshly initialised Llama. vocab_size must be the target's config.vocab_size (padded), so that
    runtimes (vLLM draft_model, HF assisted generation) treat the pair as one tokenizer."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"draft shape: hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def pretrained_draft(path: str, vocab_size: int, **_special_token_ids) -> PreTrainedModel:
    """Continue from an existing draft (e.g. a FastDraft stage-1 export). Its vocabulary must match the target's."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    draft_vocab = model.config.get_text_config().vocab_size
    if draft_vocab != vocab_size:
        raise ValueError(
            f"draft at {path} has vocab_size={draft_vocab} but the target has {vocab_size}; a draft must share the "
            "target's (padded) vocabulary. Fix: train a draft for this target, or pick the matching target"
        )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
