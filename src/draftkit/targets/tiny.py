"""Random Llama targets with a byte-level chat tokenizer, built in-process (no downloads).

`tiny_target`: used by the `debug=tiny` overlay and by the tests, every code path of a recipe runs on it in seconds.
`random_target`: any Llama shape (named in SHAPES, e.g. llama3_8b), initialised directly on its device in its dtype,
for throughput measurements, where shapes and not quality set the cost.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from draftkit.targets.hf import Target, freeze

# Builder arguments per named shape; llama3_8b is Llama-3.1-8B's geometry (untied embeddings, 128k vocabulary).
SHAPES = {
    "tiny": {"vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 64},
    "llama3_8b": {"vocab_size": 128256, "hidden_size": 4096, "num_layers": 32, "num_heads": 32, "num_kv_heads": 8,
                  "intermediate_size": 14336, "rope_theta": 500000.0, "tie_word_embeddings": False,
                  "max_position_embeddings": 8192},
    # SmolLM2-135M's geometry (the default target's): for GPU timings of work whose cost its shape sets, where the
    # GGUF file is not at hand.
    "smollm2_135m": {"vocab_size": 49152, "hidden_size": 576, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
                     "intermediate_size": 1536, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192},
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens after 3 special tokens) with a ChatML template.

    Ids match SmolLM2's special tokens: 0 = <|endoftext|> (unk), 1 = <|im_start|> (bos), 2 = <|im_end|> (eos/pad).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _llama_config(tokenizer, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                  intermediate_size: int, rope_theta: float = 10000.0, tie_word_embeddings: bool = True,
                  max_position_embeddings: int = 2048) -> LlamaConfig:
    if vocab_size < len(tokenizer):
        raise ValueError(f"random target vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)} ids)")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_target(
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Target:
    """A random Llama target; vocab_size is padded past the tokenizer's 259 ids, as real models often are. Built on
    the CPU in fp32 and then moved, so it has the same weights on every device."""
    tokenizer = byte_tokenizer()
    config = _llama_config(tokenizer, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device=device, dtype=getattr(torch, dtype))
    return Target(model=freeze(model), tokenizer=tokenizer, name=f"tiny-llama-h{hidden_size}-l{num_layers}-v{vocab_size}-s{seed}")


def random_target(shape: str = "llama3_8b", *, seed: int = 0, dtype: str = "bfloat16", device: str = "auto",
                  **shape_overrides) -> Target:
    """A random Llama of the named shape (SHAPES; keyword arguments override single dimensions), initialised
    directly on `device` in `dtype`: an 8B shape takes seconds on a GPU and never exists in fp32 or on the CPU. Its
    weights depend on the device's random generator, unlike tiny_target's."""
    if shape not in SHAPES:
        raise ValueError(f"random target shape={shape!r}: choose one of {', '.join(SHAPES)}")
    unknown = set(shape_overrides) - set(SHAPES["llama3_8b"])
    if unknown:
        raise ValueError(f"random target has no dimension {sorted(unknown)}; valid: {sorted(SHAPES['llama3_8b'])}")
    dims = {**SHAPES[shape], **shape_overrides}
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    tokenizer = byte_tokenizer()
    config = _llama_config(tokenizer, **dims)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            with device:
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    name = f"random-llama-{shape}-h{dims['hidden_size']}-l{dims['num_layers']}-v{dims['vocab_size']}-s{seed}"
    return Target(model=freeze(model), tokenizer=tokenizer, name=name)
