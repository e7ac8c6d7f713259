"""A merged model as a Hugging Face directory: config.json, sharded safetensors with HF
names and layouts plus their index, generation_config.json and the tokenizer files.

Deltas are folded into a float32 base (each method's `merge`) and cast to the export
dtype one tensor at a time while the shards are written, so besides the model the host
holds about one shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from jft.models import FAMILIES, ModelConfig
from jft.models.tensor_names import checkpoint_tensors
from jft.storage import save_safetensors, writing

DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 2**30


def merged_params(model) -> dict:
    """`model.params` (float32) with every adapter of `model` folded in."""
    params = model.params
    for adapter in model.adapters:
        params = adapter.impl.merge(params, adapter.delta, model.config, adapter.config)
    return params


def hf_config(config: ModelConfig) -> dict:
    """config.json for a model that did not come with one (a GGUF file)."""
    families = {family.__name__.rsplit(".", 1)[-1]: family for family in FAMILIES}
    return families[config.family].to_hf(config)


def merged_bytes(model, dtype: str = "bf16") -> int:
    """About the size of `write_hf_dir`'s output: the weights in `dtype` (merging keeps
    their shapes) and the tokenizer files it copies."""
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    weights = sum(int(np.prod(shape)) * itemsize for _, shape, _ in
                  checkpoint_tensors(model.params, model.config, lambda source: source.hf))
    copied = [model.source / name for name in _TOKENIZER_FILES] if model.source.is_dir() else []
    return weights + sum(path.stat().st_size for path in copied if path.is_file())


def write_hf_dir(model, directory: Path, dtype: str = "bf16",
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes the merged model to `directory` (which must not exist yet); on failure,
    removes it again. Free space is the caller's to check, with `merged_bytes` (python -m
    jft.export does)."""
    params = merged_params(model)
    directory = Path(directory)
    with writing(directory):
        directory.mkdir(parents=True)
        source = model.source
        if source.is_dir() and (source / "config.json").is_file():
            fields = json.loads((source / "config.json").read_text())
        else:
            fields = hf_config(model.config)
        # `dtype` for transformers 5, `torch_dtype` for 4.
        fields["dtype"] = fields["torch_dtype"] = np.dtype(DTYPES[dtype]).name
        (directory / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        _write_generation_config(model, directory)
        _write_tokenizer(model, directory)
        _write_shards(params, model.config, directory, DTYPES[dtype], max_shard_bytes)


def _write_shards(params, config, directory: Path, dtype, max_shard_bytes: int) -> None:
    tensors = list(checkpoint_tensors(params, config, lambda source: source.hf))
    shards: list[list] = [[]]
    size = 0
    for entry in tensors:  # planned from shapes first: file names carry the shard count
        nbytes = int(np.prod(entry[1])) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        arrays = {}
        for hf_name, _, read in shard:
            arrays[hf_name] = np.ascontiguousarray(read().astype(dtype))
            total += arrays[hf_name].nbytes
            weight_map[hf_name] = name
        save_safetensors(arrays, directory / name, metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_generation_config(model, directory: Path) -> None:
    source = model.source / "generation_config.json"
    if model.source.is_dir() and source.is_file():
        shutil.copyfile(source, directory / "generation_config.json")
        return
    fields = {"bos_token_id": model.config.bos_id, "eos_token_id": model.config.eos_id}
    if model.tokenizer is not None and model.tokenizer.pad_id is not None:
        fields["pad_token_id"] = model.tokenizer.pad_id
    (directory / "generation_config.json").write_text(json.dumps(fields, indent=2) + "\n")


def _write_tokenizer(model, directory: Path) -> None:
    # An HF directory: its own files' bytes, exactly, with a new file's mode (copyfile, not
    # copy: a source's 0600 must not carry over into an export meant to be shared).
    if model.source.is_dir():
        for name in _TOKENIZER_FILES:
            if (model.source / name).is_file():
                shutil.copyfile(model.source / name, directory / name)
        return
    if model.tokenizer is not None:
        model.tokenizer.save_hf(directory)
