"""Standalone draft language models (FastDraft, DistillSpec): small causal LMs sharing the target's vocabulary."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from draftkit.drafts import seeded_init


def llama_draft(
    vocab_size: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 768,
    max_position_embeddings: int | None = None,
    rope_theta: float = 100000.0,
    tie_word_embeddings: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    embedding_init: str = "random",
    target_embedding: torch.Tensor | None = None,
    target_model: torch.nn.Module | None = None,
) -> PreTrainedModel:
    """A freshly initialised Llama (`target_model` is accepted and unused: every draft builder takes the same
    call-site arguments). vocab_size must be the target's config.vocab_size (padded), so that
    runtimes (vLLM draft_model, HF assisted generation) treat the pair as one tokenizer.

    embedding_init="target_pca" starts the (tied) embedding from the target's embedding [V, D] projected onto
    its top `hidden_size` principal directions, so the draft begins with the target's token geometry instead
    of learning it from scratch; "random" is the usual initialisation.

    max_position_embeddings=None takes the target's context length (LlamaConfig's default without a target): serving
    engines cap a request at the shorter of the two (vLLM clamps to the draft's), and the draft's plain RoPE holds at
    any position.
    """
    if embedding_init not in ("random", "target_pca"):
        raise ValueError(f"embedding_init={embedding_init!r}: use random or target_pca")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"draft shape: hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    if max_position_embeddings is None and target_model is not None:
        max_position_embeddings = target_model.config.get_text_config().max_position_embeddings
    context = {} if max_position_embeddings is None else {"max_position_embeddings": max_position_embeddings}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **context,
    )
    with seeded_init(seed):
        model = LlamaForCausalLM(config)
        if embedding_init == "target_pca":
            if target_embedding is None:
                raise ValueError("embedding_init=target_pca needs the target's embedding matrix")
            model.get_input_embeddings().weight.data.copy_(pca_embedding(target_embedding, hidden_size))
    return model


def pca_embedding(embedding: torch.Tensor, dim: int) -> torch.Tensor:
    """[V, D] -> [V, dim]: coordinates on the top-`dim` principal directions, rescaled to the usual init scale.

    Centering is harmless for a tied LM head: it shifts every logit at a position by the same amount.
    """
    weight = embedding.detach().float().cpu()
    if dim > weight.shape[1]:
        raise ValueError(f"cannot project a {weight.shape[1]}-dim target embedding up to {dim} dims")
    centered = weight - weight.mean(0, keepdim=True)
    # Eigenvectors of the D x D covariance: exact and deterministic (a randomized PCA would make runs differ).
    _, eigenvectors = torch.linalg.eigh(centered.double().T @ centered.double())
    basis = eigenvectors[:, -dim:].flip(-1).float()
    projected = centered @ basis
    return projected * (0.02 / projected.std())


def pretrained_draft(path: str, vocab_size: int, **_builder_args) -> PreTrainedModel:
    """Continue from an existing draft (e.g. a FastDraft stage-1 export). Its vocabulary must match the target's."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    draft_vocab = model.config.get_text_config().vocab_size
    if draft_vocab != vocab_size:
        raise ValueError(
            f"draft at {path} has vocab_size={draft_vocab} but the target has {vocab_size}; a draft must share the "
            "target's (padded) vocabulary. Fix: train a draft for this target, or pick the matching target"
        )
    return model


def draft_from_target(target_model: torch.nn.Module, num_layers: int = 2, vocab_size: int | None = None,
                      **_builder_args) -> PreTrainedModel:
    """The target's embeddings, its first `num_layers` decoder layers, its final norm and LM head, as an independent
    fp32 model of the same architecture.

    A draft that needs nothing but the target: it shares the vocabulary and tokenizer by construction, starts with
    the target's own token geometry, and is loadable by every runtime that loads the target's architecture.
    """
    config = copy.deepcopy(target_model.config)
    text_config = config.get_text_config()
    depth = text_config.num_hidden_layers
    if not 1 <= num_layers < depth:
        raise ValueError(f"draft.num_layers={num_layers}: a draft from the target keeps between 1 and {depth - 1} of "
                         f"its {depth} layers")
    text_config.num_hidden_layers = num_layers
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = list(text_config.layer_types)[:num_layers]
    config.architectures = list(getattr(target_model.config, "architectures", None) or [type(target_model).__name__])
    config.name_or_path = ""  # the copied config names the target's checkpoint; this model is not that checkpoint
    with torch.device("cpu"):
        draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = draft.state_dict()
    source = {k: v for k, v in target_model.state_dict().items() if k in wanted}
    missing = sorted(set(wanted) - set(source))
    if missing:
        raise ValueError(f"cannot build a draft from {type(target_model).__name__}: no target weights for {missing[:5]}")
    draft.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in source.items()}, strict=True)
    if vocab_size is not None and draft.get_output_embeddings().weight.shape[0] != vocab_size:
        raise ValueError(f"draft from target has {draft.get_output_embeddings().weight.shape[0]} output rows, "
                         f"expected vocab_size={vocab_size}")
    return draft


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
