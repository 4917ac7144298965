"""Export a standalone draft LM as a Hugging Face directory that HF, vLLM and SGLang load as a draft model.

Layout (what HF assisted generation, vLLM's draft_model and SGLang's STANDALONE drafts load): config.json with the
target's padded vocab_size, model.safetensors, the target's tokenizer files, generation_config.json with the
assisted-generation knobs, draftkit_config.yaml (the resolved training config), and README.md, a model card holding the
measured acceptance table.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from draftkit.engine.distributed import is_main_process
from draftkit.export.artifact import ArtifactError, LoadedDraft, read_tensor_file
from draftkit.export.card import draftkit_target, model_card, target_load_name
from draftkit.io import staged_directory


def card(name: str, *, target_name: str, target_reference: dict | None, recipe: str, vocab_size: int, params: int,
         eval_table: str, gamma: int, context_note: str = "") -> str:
    load = target_load_name(target_name, target_reference)
    hf = f"""from transformers import AutoModelForCausalLM, AutoTokenizer
target = AutoModelForCausalLM.from_pretrained("{load}")
tok = AutoTokenizer.from_pretrained("{load}")
draft = AutoModelForCausalLM.from_pretrained("{name}")  # this folder, or the Hub repo it was pushed to
inputs = tok.apply_chat_template([{{"role": "user", "content": "Hi!"}}], add_generation_prompt=True,
                                 return_tensors="pt", return_dict=True)
out = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=64)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:]))"""
    vllm = (f"vllm serve {load} --speculative-config "
            f"'{{\"method\": \"draft_model\", \"model\": \"{name}\", \"num_speculative_tokens\": {gamma}}}'")
    sglang = (f"python -m sglang.launch_server --model {load} --speculative-algorithm STANDALONE "
              f"--speculative-draft-model-path {name} --speculative-num-steps {gamma}")
    return model_card(
        title=f"Draft model for {load}", library_name="transformers", tags=["draft-model", recipe],
        summary=(f"A draft model for speculative decoding, trained with draftkit (recipe `{recipe}`). It shares the "
                 f"target's tokenizer and its padded vocabulary (`vocab_size = {vocab_size}`), so runtimes treat the "
                 f"pair as one tokenizer and verify index by index. Parameters: {params:,}.{context_note}"),
        target_name=target_name, target_reference=target_reference, eval_table=eval_table,
        usage=[("Hugging Face transformers (assisted generation; `generation_config.json` sets "
                f"`num_assistant_tokens={gamma}`)", "python", hf), ("vLLM", "bash", vllm), ("SGLang", "bash", sglang),
               ("draftkit (τ and α on your prompts)", "bash",
                f"python -m draftkit.eval --draft {name} --target {draftkit_target(target_name, target_reference)}")])


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
    eval_table_md: str = "",
    target_reference: dict | None = None,
    target_context_length: int | None = None,
    shown_as: str | None = None,
) -> Path:
    """Write the directory atomically (staging dir + rename), replacing an earlier export at `out_dir`.

    `target_reference` (Target.reference()) names the target in the model card; `target_context_length` is the
    target's max_position_embeddings: a draft with a shorter one makes vLLM cap every request at the draft's length,
    which the card and the console then say (the draft's own setting is kept, as the user configured it). `shown_as`:
    the path the card names (default `out_dir`; an exporter writing into its own staging folder passes the final one)."""
    text_config = draft.config.get_text_config()
    draft_vocab = text_config.vocab_size
    if draft_vocab != target_vocab_size:
        raise ValueError(f"draft vocab_size {draft_vocab} != target vocab_size {target_vocab_size}; runtimes would "
                         "treat them as different tokenizers")
    out_dir = Path(out_dir)
    context_note = ""
    draft_context = getattr(text_config, "max_position_embeddings", None)
    if target_context_length and draft_context and draft_context < target_context_length:
        context_note = (f" Its context is {draft_context} positions against the target's {target_context_length}: "
                        f"vLLM caps requests at {draft_context} tokens with this draft (train with "
                        "draft.max_position_embeddings=null to take the target's).")
        print(f"[draftkit] note:{context_note}")
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
        (staging / "README.md").write_text(card(
            shown_as or str(out_dir), target_name=target_name, target_reference=target_reference, recipe=recipe,
            vocab_size=target_vocab_size, params=params, eval_table=eval_table_md, gamma=num_assistant_tokens,
            context_note=context_note))
    return out_dir


def read_draft(directory, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """The draft LM in `directory`, refused (ArtifactError) unless its weights are exactly what its config.json
    describes: transformers would start a missing tensor from random weights, and a draft with a random layer still
    runs (its tau is just low). Each weights file is read whole first, so a file cut short is reported by name."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    weights = sorted(directory.glob("*.safetensors"))
    if not (directory / "config.json").is_file() or not weights:
        raise ArtifactError(f"{directory} holds no draft LM (config.json and *.safetensors). Fix: pass the export/ "
                            "directory a recipe wrote")
    for path in weights:
        read_tensor_file(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is multi-line; the problem is reported below, in one line
    try:
        draft, report = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, output_loading_info=True,
                                                             ignore_mismatched_sizes=True)
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{directory} cannot be loaded as a draft LM ({str(error).splitlines()[0]}). Fix: export "
                            "the draft again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = {what: sorted(str(k) for k in report.get(key) or ()) for what, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("misshapen", "mismatched_keys"))}
    if any(problems.values()):
        found = ", ".join(f"{what} {names[:4]}" for what, names in problems.items() if names)
        raise ArtifactError(f"{directory}: the weights do not match its config.json ({found}); a missing tensor would "
                            "run as a randomly initialised layer. Fix: export the draft again")
    return draft


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """A draft LM directory (save_pretrained output) on the target's device, frozen; it must share the target's padded
    vocabulary, or the runtime would compare token ids of two different tokenizers."""
    draft = read_draft(directory, dtype).to(target.device)
    draft.requires_grad_(False).eval()
    draft_vocab = draft.config.get_text_config().vocab_size
    if draft_vocab != target.vocab_size:
        raise ArtifactError(
            f"draft {directory} has vocab_size={draft_vocab} but target {target.name} has {target.vocab_size}. Fix: "
            "pass the --target this draft was trained for, or train a draft on this target (drafts must share the "
            "target's padded vocabulary)")
    return LoadedDraft(draft)

