"""Hydra and Hydra++ heads as artifacts, in draftkit's heads format (export/heads_dir.py): no serving runtime loads
Hydra heads, so draftkit's own directory is the only format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.export.artifact import ArtifactError, LoadedDraft, load_exact, read_tensor_file, require_same_as_target
from draftkit.export.heads_dir import export_heads_dir, load_for_target

FAMILY = "hydra_heads"


def write(heads: nn.Module, out_dir: Path, **details) -> Path:
    """export_heads_dir for this family (`details`: its keyword arguments)."""
    return export_heads_dir(heads, out_dir, family=FAMILY, **details)


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    return load_for_target(directory, target, hydra_heads, family=FAMILY, dtype=dtype, vocab_size=target.vocab_size,
                           lm_head_weight=target.lm_head.weight)


# zankner/Hydra checkpoints (hydra/train/train.py): config.json (HydraConfig: hydra_num_heads, hydra_num_layers,
# hydra_head_arch, grounded_heads, hidden_state_offset) and hydra_lm_head.pt, the `hydra_head` module's state dict.
# For hydra_head_arch "mlp" with grounded heads (HydraMLP, hydra/model/hydra_heads/mlp_head.py), head i is
#   hydra_mlp.{i}.0           ResBlock(H, num_condition=i+1): res_connection(u) + SiLU(linear(u)), u = cat(h_t, e(x_{t+1}),
#                             ..., e(x_{t+1+i})), draftkit's GroundedBlock `first.{i}`
#   hydra_mlp.{i}.{l}, l >= 1  ResBlock(H): x + SiLU(linear(x)) (one module repeated, so the tensors are the same),
#                             draftkit's `rest.{i}.layers.{l-1}`
#   hydra_lm_head.{i}         Linear(H, V) with a bias, draftkit's own `lm_heads.{i}`
# and `input_embed_fn.weight` is the target's embedding (a registered submodule; checked, not stored). h_t is the
# target's last hidden state after its final norm (hidden_state_offset 0), draftkit's input.
HYDRA_ARCHITECTURES = {
    "prefix-mlp": "Hydra++'s prefix layer is a one-layer LlamaModel whose output passes its own final RMSNorm "
                  "(prefix_embeding_layer.norm.weight); draftkit's prefix layer is a decoder layer without that norm",
    "cross-attn": "draftkit has no cross-attention Hydra head",
    "eagle-attn": "draftkit has no EAGLE-attention Hydra head",
}


def import_hydra(source: str | Path, out_dir: Path, target) -> Path:
    """A Hydra checkpoint (grounded MLP heads) -> draftkit's Hydra artifact for `target`."""
    source = Path(source)
    config_path, weights = source / "config.json", source / "hydra_lm_head.pt"
    if not config_path.is_file() or not weights.is_file():
        raise ArtifactError(f"{source}: expected config.json and hydra_lm_head.pt. Fix: pass the folder "
                            "hydra/train/train.py wrote")
    config = json.loads(config_path.read_text())
    arch, grounded = config.get("hydra_head_arch", "mlp"), config.get("grounded_heads", False)
    if arch != "mlp":
        reason = HYDRA_ARCHITECTURES.get(arch, f"unknown Hydra head architecture {arch!r}")
        raise ArtifactError(f"{config_path}: hydra_head_arch={arch!r} cannot be converted exactly: {reason}. Fix: "
                            "convert heads trained with --hydra_head_arch mlp, or train Hydra++ with draftkit "
                            "(+recipe=hydra_heads hydra_heads.heads.prefix_layer=true)")
    if not grounded or config.get("hidden_state_offset", 0) != 0:
        raise ArtifactError(f"{config_path}: grounded_heads={grounded}, hidden_state_offset="
                            f"{config.get('hidden_state_offset', 0)}; draftkit's Hydra heads are grounded and read the "
                            "last layer's state. Fix: convert heads trained with --grounded_heads true "
                            "--hidden_state_offset 0")
    K, L = config["hydra_num_heads"], config["hydra_num_layers"]
    tensors = read_tensor_file(weights)
    embed = tensors.pop("input_embed_fn.weight", None)
    if embed is not None:
        require_same_as_target(embed, target.embed_tokens.weight, "input embedding", str(weights))
    state = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[0] == "hydra_mlp" and len(parts) == 5 and parts[2] == "0":
            state[f"first.{parts[1]}.{parts[3]}.{parts[4]}"] = tensor
        elif parts[0] == "hydra_mlp" and len(parts) == 5 and parts[3] == "linear":
            state[f"rest.{parts[1]}.layers.{int(parts[2]) - 1}.{parts[4]}"] = tensor
        elif parts[0] == "hydra_lm_head" and len(parts) == 3:
            state[f"lm_heads.{parts[1]}.{parts[2]}"] = tensor
        else:
            raise ArtifactError(f"{weights}: unknown tensor {name} for grounded MLP Hydra heads. Fix: pass a "
                                "checkpoint of hydra_head_arch mlp")
    hidden = state.get("first.0.linear.weight", torch.empty(0, 0)).shape[0]
    if hidden != target.hidden_size:
        raise ArtifactError(f"{weights}: heads of hidden size {hidden}, target {target.name} has {target.hidden_size}. "
                            "Fix: pass the model the heads were trained on as --target")
    architecture = {"num_heads": K, "num_layers": L, "lm_head": "own", "prefix_layer": False, "dropout": 0.0}
    try:
        heads = hydra_heads(hidden_size=hidden, vocab_size=target.vocab_size, **architecture,
                            lm_head_weight=target.lm_head.weight)
    except ValueError as error:
        raise ArtifactError(f"{config_path}: {error}. Fix: pass the config.json the heads were trained with") from None
    load_exact(heads, state, str(weights), "config.json's hydra_num_heads/hydra_num_layers or the target's vocabulary")
    provenance = {"converted_from": {"format": "hydra", "source": str(source), "hydra_head_arch": arch}}
    return write(heads.eval(), out_dir, architecture=architecture, target_name=target.name, hidden_size=hidden,
                 vocab_size=target.vocab_size, extra_info=provenance)
