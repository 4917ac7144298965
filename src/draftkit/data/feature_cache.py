"""Target features for feature-level drafters (EAGLE-1, FSPAD): computed online, or once into an on-disk cache.

The cache is a folder: `manifest.json` (what the features are: target fingerprint, feature kind, storage, data
fingerprint) plus shards `shard_00000.safetensors`, ... of `shard_size` examples each. Each shard appears complete or
not at all (written to a temporary name, then renamed), so an interrupted build resumes at the first missing shard.
A cache whose manifest names another target, feature or dataset is refused, never silently reused.

Storage: fp32 (exact), bf16 (half the size), int8 (a quarter, plus one fp32 scale per position: symmetric absmax
quantisation per position). Readers get fp32 (`cache[i]`); training batches keep bf16 as stored (`cache.compact(i)`)
and widen on the device, which is exact and moves half the bytes through the host.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from draftkit.data.collate import collate
from draftkit.data.sources import DataError
from draftkit.io import write_json_atomic
from draftkit.targets.hf import Target

FEATURE_NORMS = ("post_norm", "pre_norm")
STORAGE_DTYPES = ("fp32", "bf16", "int8")
CACHE_VERSION = 1
_MANIFEST = "manifest.json"


class FeatureCacheMismatch(DataError):
    pass


def feature_layer(target: Target) -> int:
    """Both feature kinds are taken at the last layer: before (pre_norm) or after (post_norm) the final norm."""
    return target.num_layers


@torch.no_grad()
def target_features(target: Target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    norm: str = "post_norm") -> torch.Tensor:
    """The target's feature at every position, [B, T, H], in the target's dtype.

    Computed with autocast off, so online training, the cache and the runtime all see the same features.
    """
    if norm not in FEATURE_NORMS:
        raise ValueError(f"feature norm {norm!r}: choose one of {FEATURE_NORMS}")
    device_type = input_ids.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        layers = [feature_layer(target)] if norm == "pre_norm" else []
        out = target.features(input_ids, attention_mask, layers=layers, with_logits=False)
    return out.hidden[feature_layer(target)] if norm == "pre_norm" else out.last_hidden


def target_fingerprint(target: Target) -> str:
    """A hash of the target's name, config and a strided sample of every weight: cheap, and different for any
    retrained or re-seeded model (names alone are not enough: two tiny targets differ only in their seed)."""
    digest = hashlib.sha256()
    digest.update(target.name.encode())
    digest.update(target.config.to_json_string(use_diff=False).encode())
    for name, param in sorted(target.model.state_dict().items()):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def data_fingerprint(examples: Sequence[dict]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(list(example["input_ids"])).encode())
        digest.update(b"|")
    return digest.hexdigest()[:32]


def _encode(features: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    features = features.float()
    if storage == "fp32":
        return {"features": features.contiguous()}
    if storage == "bf16":
        return {"features": features.to(torch.bfloat16).contiguous()}
    scale = features.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    quantized = (features / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return {"features": quantized.contiguous(), "scales": scale.contiguous()}


def _decode(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    features = tensors["features"]
    if features.dtype == torch.int8:
        return features.float() * tensors["scales"][:, None]
    return features.float()


def _describe_mismatch(found: dict, expected: dict) -> str:
    differing = [k for k in expected if found.get(k) != expected[k]]
    details = "; ".join(f"{k}: cache has {found.get(k)!r}, this run needs {expected[k]!r}" for k in differing)
    return details


def expected_manifest(target: Target, examples: Sequence[dict], *, norm: str, storage: str, shard_size: int) -> dict:
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"feature cache storage {storage!r}: choose one of {STORAGE_DTYPES}")
    if norm not in FEATURE_NORMS:
        raise ValueError(f"feature norm {norm!r}: choose one of {FEATURE_NORMS}")
    if shard_size < 1:
        raise ValueError(f"feature cache shard_size must be >= 1; got {shard_size}")
    return {
        "version": CACHE_VERSION,
        "target": target.name,
        "target_fingerprint": target_fingerprint(target),
        "feature": {"norm": norm, "layer": feature_layer(target)},
        "hidden_size": target.hidden_size,
        "storage": storage,
        "num_examples": len(examples),
        "shard_size": shard_size,
        "data_fingerprint": data_fingerprint(examples),
    }


def _check_manifest(cache_dir: Path, expected: dict) -> None:
    found = json.loads((cache_dir / _MANIFEST).read_text())
    found.pop("complete", None)
    if found == expected:
        return
    raise FeatureCacheMismatch(
        f"the feature cache at {cache_dir} was made for something else ({_describe_mismatch(found, expected)}). "
        "Features from another target, feature kind or dataset would train a wrong draft. Fix: point the cache path "
        "(fspad.features.cache) at a new folder, or delete this one to rebuild it"
    )


def build_feature_cache(
    target: Target,
    examples: Sequence[dict],
    cache_dir: str | os.PathLike,
    *,
    norm: str = "post_norm",
    storage: str = "bf16",
    shard_size: int = 256,
    batch_size: int = 8,
    pad_token_id: int = 0,
    progress: bool = True,
) -> "FeatureCache":
    """Compute the target's features for every example (`input_ids` lists) into `cache_dir`; resume if interrupted."""
    cache_dir = Path(cache_dir)
    expected = expected_manifest(target, examples, norm=norm, storage=storage, shard_size=shard_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / _MANIFEST).is_file():
        _check_manifest(cache_dir, expected)
    else:
        write_json_atomic(cache_dir / _MANIFEST, expected)
    num_shards = -(-len(examples) // shard_size)
    device = target.device
    with tqdm(total=len(examples), desc="target features", unit="example", disable=not progress) as bar:
        for shard in range(num_shards):
            path = cache_dir / f"shard_{shard:05d}.safetensors"
            indices = range(shard * shard_size, min(len(examples), (shard + 1) * shard_size))
            if path.is_file():
                bar.update(len(indices))
                continue
            tensors = {}
            for start in range(indices.start, indices.stop, batch_size):
                batch_indices = range(start, min(indices.stop, start + batch_size))
                batch = collate([{"input_ids": examples[i]["input_ids"], "labels": examples[i]["input_ids"]}
                                 for i in batch_indices], pad_token_id=pad_token_id)
                features = target_features(target, batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device), norm).cpu()
                for row, index in enumerate(batch_indices):
                    length = len(examples[index]["input_ids"])
                    for name, tensor in _encode(features[row, :length], storage).items():
                        tensors[f"{name}.{index}"] = tensor
                bar.update(len(batch_indices))
            staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(tensors, str(staging))
            os.replace(staging, path)
    write_json_atomic(cache_dir / _MANIFEST, {**expected, "complete": True})
    return FeatureCache(cache_dir)


class FeatureCache:
    """Read access to a finished cache: cache[i] is example i's features [T_i, H] in fp32."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        path = self.cache_dir / _MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no feature cache at {self.cache_dir} (no {_MANIFEST}). Fix: build it first "
                                    "(fspad.stages=[features] with fspad.features.source=offline)")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise DataError(f"the feature cache at {self.cache_dir} is incomplete (its build was interrupted). Fix: "
                            "run the features stage again with the same settings; it resumes at the first missing shard")
        self._shards: dict[int, object] = {}

    def __len__(self) -> int:
        return self.manifest["num_examples"]

    def check(self, expected: dict) -> None:
        """Refuse the cache unless it was made for exactly this target, feature, storage and dataset."""
        _check_manifest(self.cache_dir, expected)

    def _shard(self, index: int):
        shard = index // self.manifest["shard_size"]
        if shard not in self._shards:
            self._shards[shard] = safe_open(str(self.cache_dir / f"shard_{shard:05d}.safetensors"), framework="pt")
        return self._shards[shard]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.compact(index).float()

    def compact(self, index: int) -> torch.Tensor:
        """Example `index`'s features [T_i, H]: bf16 as stored for bf16 caches (widening to fp32 is exact, so a
        consumer may do it on the device), fp32 otherwise."""
        if not 0 <= index < len(self):
            raise IndexError(f"feature cache index {index} out of range 0..{len(self) - 1}")
        shard = self._shard(index)
        if self.manifest["storage"] == "int8":
            return _decode({name: shard.get_tensor(f"{name}.{index}") for name in ("features", "scales")})
        return shard.get_tensor(f"features.{index}")

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.cache_dir.glob("shard_*.safetensors"))


class FeatureExamples:
    """Tokenized examples paired with their cached features, indexable like the dataset the loop expects."""

    def __init__(self, examples: Sequence[dict], cache: FeatureCache):
        if len(examples) != len(cache):
            raise FeatureCacheMismatch(f"{len(examples)} examples but {len(cache)} cached feature rows")
        self.examples, self.cache = examples, cache

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Tokens per example, without reading any features (for length-grouped batching)."""
        if hasattr(self.examples, "column_names"):
            return [len(ids) for ids in self.examples["input_ids"]]
        return [len(example["input_ids"]) for example in self.examples]

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"input_ids": example["input_ids"], "labels": example["labels"], "features": self.cache.compact(index)}


def collate_with_features(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus, when the examples carry them, their features padded with zeros to [B, T, H] (in their dtype)."""
    batch = collate(examples, pad_token_id)
    if "features" in examples[0]:
        batch_size, length = batch["input_ids"].shape
        first = examples[0]["features"]
        features = torch.zeros(batch_size, length, first.shape[-1], dtype=first.dtype)
        for row, example in enumerate(examples):
            features[row, : example["features"].shape[0]] = example["features"]
        batch["features"] = features
    return batch
