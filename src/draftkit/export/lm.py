"""Export a standalone draft LM as a Hugging Face directory that HF, vLLM and SGLang load as a draft model.

Layout (formats.md b.5): config.json with the target's padded vocab_size, model.safetensors, the target's
tokenizer files, generation_config.json with the assisted-generation knobs, draftkit_config.yaml (the
resolved training config), and README.md, a model card holding the measured acceptance table.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from draftkit.engine.distributed import is_main_process
from draftkit.export.artifact import ArtifactError, LoadedDraft
from draftkit.io import staged_directory

CARD_TEMPLATE = """---
library_name: transformers
tags: [speculative-decoding, draft-model, draftkit]
---
# {name}

A draft model for speculative decoding of **{target}**, trained with draftkit (recipe `{recipe}`).
It shares the target's tokenizer and its padded vocabulary (`vocab_size = {vocab_size}`), so runtimes treat
the pair as one tokenizer and verify index by index. Parameters: {params:,}.

## Measured acceptance
{eval_table}

τ counts tokens per target forward including the bonus token (autoregressive decoding = 1.00); α_i is the
acceptance rate at draft position i given the earlier positions were accepted. Measured with draftkit's
speculative runtime on the prompts named above; wall-clock numbers depend on the machine.

## Use it
Hugging Face transformers (assisted generation; `generation_config.json` sets `num_assistant_tokens={gamma}`):
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
target = AutoModelForCausalLM.from_pretrained("<target>")
draft = AutoModelForCausalLM.from_pretrained("<this directory>")
tok = AutoTokenizer.from_pretrained("<target>")
out = target.generate(**tok("Hello", return_tensors="pt"), assistant_model=draft, do_sample=False, max_new_tokens=64)
```
vLLM:
```
vllm serve <target> --speculative-config '{{"method": "draft_model", "model": "<this directory>", "num_speculative_tokens": {gamma}}}'
```
SGLang:
```
python -m sglang.launch_server --model <target> --speculative-algorithm STANDALONE --speculative-draft-model-path <this directory> --speculative-num-steps {gamma}
```
"""


def export_hf_draft(
    draft: PreTrainedModel,
    tokenizer,
    out_dir: Path,
    *,
    target_name: str,
    target_vocab_size: int,
    recipe: str,
    num_assistant_tokens: int,
    resolved_config_yaml: str,
    eval_table_md: str = "(not measured)",
) -> Path:
    """Write the directory atomically (staging dir + rename), replacing an earlier export at `out_dir`."""
    draft_vocab = draft.config.get_text_config().vocab_size
    if draft_vocab != target_vocab_size:
        raise ValueError(f"draft vocab_size {draft_vocab} != target vocab_size {target_vocab_size}; runtimes would "
                         "treat them as different tokenizers")
    out_dir = Path(out_dir)
    if not is_main_process():  # in a multi-process job every rank holds the same draft; rank 0 writes it
        return out_dir
    with staged_directory(out_dir) as staging:
        gen = draft.generation_config
        gen.num_assistant_tokens = num_assistant_tokens
        gen.num_assistant_tokens_schedule = "constant"
        # HF otherwise cuts drafting short below 0.4 draft confidence; 0 keeps the fixed-length chain the card measured.
        gen.assistant_confidence_threshold = 0.0
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(gen, key, value)
        draft.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "draftkit_config.yaml").write_text(resolved_config_yaml)
        params = sum(p.numel() for p in {id(p): p for p in draft.parameters()}.values())
        (staging / "README.md").write_text(CARD_TEMPLATE.format(
            name=out_dir.name, target=target_name, recipe=recipe, vocab_size=target_vocab_size, params=params,
            eval_table=eval_table_md, gamma=num_assistant_tokens))
    return out_dir


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """A draft LM directory (save_pretrained output) on the target's device, frozen; it must share the target's padded
    vocabulary, or the runtime would compare token ids of two different tokenizers."""
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(target.device)
    draft.requires_grad_(False).eval()
    draft_vocab = draft.config.get_text_config().vocab_size
    if draft_vocab != target.vocab_size:
        raise ArtifactError(
            f"draft {directory} has vocab_size={draft_vocab} but target {target.name} has {target.vocab_size}. Fix: "
            "pass the --target this draft was trained for, or train a draft on this target (drafts must share the "
            "target's padded vocabulary)")
    return LoadedDraft(draft)

