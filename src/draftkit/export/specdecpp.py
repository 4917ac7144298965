"""SpecDec++ artifact: a standalone draft LM with its acceptance head and a static stop policy, in one directory.

Layout:
  (the draft)           an HF directory (export/lm.py): config.json, model.safetensors, tokenizer,
                        generation_config.json (num_assistant_tokens = the policy's γ), README.md, ...; vLLM, SGLang
                        and HF assisted generation load it as a plain draft model
  draftkit.json         {"family": "specdecpp", "head": "acceptance_head", "stop_policy": "stop_policy.json"}
  acceptance_head/      config.json {hidden_size, num_layers} (the reference's PyTorchModelHubMixin config),
                        model.safetensors (blocks.{i}.linear.weight/bias, out.weight/bias), manifest.json,
                        draftkit.json {family, draft_fingerprint, threshold, min_tokens, max_draft_tokens, target, ...}
  stop_policy.json      the static policy (runtime/specdecpp.py: stop_policy) for runtimes without the head
The head is refused on load unless its key set is exactly the module's and the draft it is given has the fingerprint
it was trained for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from draftkit.drafts.specdecpp import AcceptanceHead, acceptance_head, draft_fingerprint
from draftkit.export import lm
from draftkit.export.artifact import (
    ArtifactError,
    LoadedDraft,
    cast_tensors,
    load_exact,
    manifest,
    read_json,
    read_tensor_file,
    write_dir,
)
from draftkit.export.lm import export_hf_draft
from draftkit.io import staged_directory, write_json_atomic

FAMILY = "specdecpp"
HEAD_DIR = "acceptance_head"
POLICY_FILE = "stop_policy.json"
WEIGHTS = "model.safetensors"


def export_acceptance_head(head: AcceptanceHead, out_dir: Path, *, draft_fingerprint_: str, info: dict) -> Path:
    """The head alone: `info` (threshold, min_tokens, max_draft_tokens, target, ...) goes into its draftkit.json."""
    tensors = cast_tensors(head.state_dict(), torch.float32)
    config = {"hidden_size": head.hidden_size, "num_layers": head.num_layers}
    meta = {"family": FAMILY, "format_version": 1, **config, "draft_fingerprint": draft_fingerprint_, **info}
    return write_dir(out_dir, {"config.json": config, WEIGHTS: tensors, "manifest.json": manifest(tensors),
                               "draftkit.json": meta})


def check_head_matches_draft(info: dict, draft: nn.Module, where: str) -> None:
    """Refuse a head trained on another draft's hidden states (the hidden size alone cannot tell two cuts apart)."""
    found = draft_fingerprint(draft)
    if info.get("draft_fingerprint") != found:
        raise ArtifactError(
            f"{where}: this acceptance head was trained for another draft (draft fingerprint "
            f"{info.get('draft_fingerprint')}, trained for {info.get('draft', 'an unnamed draft')}), but the draft "
            f"given has fingerprint {found}. Its predictions would not mean anything on this draft's states. Fix: "
            "use the draft exported next to the head (the same export directory), or train a head for this draft "
            "(+recipe=specdecpp draft=pretrained draft.path=<this draft>)")


def load_acceptance_head(head_dir: str | Path, draft: nn.Module | None = None) -> tuple[AcceptanceHead, dict]:
    """The head (fp32, eval mode) and its draftkit.json. With `draft`, the draft's fingerprint must be the recorded
    one. Any missing, unknown or misshapen tensor is an error."""
    head_dir = Path(head_dir)
    info = read_json(head_dir / "draftkit.json")
    if info.get("family") != FAMILY:
        raise ArtifactError(f"{head_dir} holds a {info.get('family')!r} artifact, not a SpecDec++ acceptance head")
    config = read_json(head_dir / "config.json")
    head = acceptance_head(config["hidden_size"], config["num_layers"])
    load_exact(head, read_tensor_file(head_dir / WEIGHTS), str(head_dir), "its config.json. Fix: re-export the head")
    if draft is not None:
        check_head_matches_draft(info, draft, str(head_dir))
    return head.float().eval(), info


def export_specdecpp(draft, head: AcceptanceHead, tokenizer, out_dir: Path, *, target_name: str,
                     target_vocab_size: int, head_info: dict, stop_policy: dict, resolved_config_yaml: str,
                     eval_table_md: str, target_reference: dict | None = None,
                     target_context_length: int | None = None) -> Path:
    """Write the draft, the head and the policy into a staging directory, then swap it in as `out_dir`."""
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        export_hf_draft(draft, tokenizer, staging, target_name=target_name, target_vocab_size=target_vocab_size,
                        recipe=FAMILY, num_assistant_tokens=stop_policy["num_speculative_tokens"],
                        resolved_config_yaml=resolved_config_yaml, eval_table_md=eval_table_md,
                        target_reference=target_reference, target_context_length=target_context_length,
                        shown_as=str(out_dir))
        export_acceptance_head(head, staging / HEAD_DIR, draft_fingerprint_=draft_fingerprint(draft), info=head_info)
        write_json_atomic(staging / POLICY_FILE, stop_policy)
        write_json_atomic(staging / "draftkit.json", {"family": FAMILY, "head": HEAD_DIR, "stop_policy": POLICY_FILE,
                                                      "target": target_name})
    return out_dir


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """The draft (as export/lm.py loads it) and its acceptance head, with what the runtime needs from both records:
    the head's stop rule and its most draft tokens per step, and the static policy's gamma (for --no-head)."""
    root = Path(directory)
    info = read_json(root / "draftkit.json")
    draft = lm.load(root, target, dtype).module
    head, head_info = load_acceptance_head(root / info["head"], draft)
    policy = read_json(root / info["stop_policy"])
    settings = {"threshold": head_info["threshold"], "min_tokens": head_info["min_tokens"],
                "score_first_token": head_info.get("score_first_token", False),
                "max_draft_tokens": head_info["max_draft_tokens"], "static_gamma": policy["num_speculative_tokens"]}
    return LoadedDraft((draft, head.to(target.device)), settings=settings, info=info)

