"""`python -m jft.export RUN_DIR --out DIR --format merged|peft|jft|gguf`: take a
fine-tuned model to transformers, vLLM, PEFT and llama.cpp / Ollama.

RUN_DIR is a `python -m jft.train` run directory (its latest checkpoint, over the model
its config names); or give `--model M --adapter DIR` for any adapter jft reads (a run
directory or a PEFT adapter directory; without --model, the base the adapter names).
`merged` folds the deltas into the weights and writes an HF model directory; `peft` writes
`adapter_config.json` and `adapter_model.safetensors`; `jft` writes jft's own adapter
format, which every method has (docs/formats.md); `gguf` writes the merged model as
DIR/model.gguf. An existing --out is moved aside only with --overwrite. --out is checked
before the model loads and free space before writing; a failed export leaves nothing.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

from jft.errors import JftError, run_cli

FORMATS = ("merged", "peft", "jft", "gguf")
# What each format can express; the others have no equivalent there.
# Virtual tokens are inputs, not weights; routed LoRA experts are a function of the input.
UNMERGEABLE = ("prompt_tuning", "prefix_tuning", "mixlora", "mola")


def build_parser():
    from jft.generate import ArgumentParser

    parser = ArgumentParser(prog="python -m jft.export",
                            description="Export a fine-tuned model (see docs/export.md).")
    parser.add_argument("run", nargs="?",
                        help="a jft.train run directory (its latest checkpoint), or one "
                        "checkpoint of it: RUN/checkpoints/N")
    parser.add_argument("--model", help="the base model (default: the run's config)")
    parser.add_argument("--adapter", help="an adapter instead of RUN: run dir or PEFT dir")
    parser.add_argument("--out", required=True, help="the directory to write (must not exist)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="merged weights' dtype (the merge itself runs in float32)")
    parser.add_argument("--quant", default="f16", choices=("f16", "q8_0", "q4_0", "f32"),
                        help="gguf weights' type (norms and biases stay f32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move an existing --out aside (to OUT.oldN) instead of refusing")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.run is None) == (args.adapter is None):
        raise JftError("give a run directory, or --model and --adapter (not both)")
    from jft import storage
    from jft.formats.adapters import check_adapter_exists

    adapter = Path(args.run or args.adapter)
    if args.adapter is not None:
        check_adapter_exists(adapter, "--adapter")
    elif not adapter.exists():
        raise JftError(f"{adapter}: run directory does not exist; give a python -m jft.train "
                       "run directory (or RUN/checkpoints/N), or --model and --adapter")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise JftError(f"{out} exists; choose another --out, or pass --overwrite to move it "
                       "aside")
    # Written beside --out and renamed at the end: a failed export leaves no half model.
    partial = out.with_name(out.name + ".partial")
    storage.check_creatable(partial if out.exists() else out, "--out")
    model_name = args.model or _base_model(adapter)
    import jft
    # A run's base loads quantized as it trained (`jft.load` reads the run's keys).
    model = jft.load(model_name, dtype="float32", compute_dtype="float32", adapter=adapter)
    if model.quantization is not None and args.format in ("merged", "gguf"):
        from jft.quant.params import dequantize_params

        # PEFT's merge of a QLoRA adapter does the same: the weights the adapter was
        # trained against are the dequantized ones, not the original floats.
        model.params = dequantize_params(model.params, model.config)
        print(f"the run trained on a {model.quantization.format} base: its adapter is folded "
              "into the dequantized weights, written as floats", file=sys.stderr)
    for a in model.adapters:
        _check_expressible(a.method, args.format)
    adapter = model.adapters[0] if model.adapters else None
    shutil.rmtree(partial, ignore_errors=True)  # a killed export's leftovers
    needed = export_bytes(model, adapter, args.format, args.dtype, args.quant)
    with storage.writing(out, needed, partial=_topmost_missing(partial)):
        write_model(model, adapter, args.format, partial, str(model_name), args.dtype,
                    args.quant)
    publish(partial, out)
    return 0


def export_bytes(model, adapter, format: str, dtype: str = "bf16", quant: str = "f16") -> int:
    """About the bytes `write_model` writes: the weights (in --dtype, or as GGUF), or the
    adapter's delta (float32 in a PEFT file, as it is in jft's)."""
    if format == "merged":
        from jft.formats.hf_export import merged_bytes

        return merged_bytes(model, dtype)
    if format == "gguf":
        from jft.formats.gguf_export import gguf_bytes

        return gguf_bytes(model.config, model.params, model.tokenizer, quant)
    import jax

    return sum(leaf.size * (4 if format == "peft" else leaf.dtype.itemsize)
               for leaf in jax.tree.leaves(adapter.delta))


def _topmost_missing(path: Path) -> Path:
    """The outermost of `path` and its parents that does not exist: what writing it creates."""
    missing = path
    for parent in path.parents:
        if parent.exists():
            break
        missing = parent
    return missing


def write_model(model, adapter, format: str, directory: Path, base_name: str,
                dtype: str = "bf16", quant: str = "f16") -> None:
    """`model` (its adapters folded in) as an HF directory or a GGUF file, or `adapter`
    as a PEFT or jft adapter directory, written to `directory` (which must not exist)."""
    if format == "merged":
        from jft.formats.hf_export import write_hf_dir

        write_hf_dir(model, directory, dtype)
        return
    directory.mkdir(parents=True)
    if format == "gguf":
        from jft.formats.gguf_export import write_gguf_file
        from jft.formats.hf_export import merged_params

        write_gguf_file(model.config, merged_params(model), model.tokenizer,
                        directory / "model.gguf", quant)
    elif format == "peft":
        from jft.formats.bundled import HUB_IDS
        from jft.formats.peft_adapter import save_peft_adapter

        save_peft_adapter(adapter, model.config, directory, HUB_IDS.get(base_name, base_name))
    else:
        from jft.formats.jft_adapter import save_jft_adapter

        save_jft_adapter(adapter, model.config, directory, base_name)


def publish(partial: Path, out: Path) -> None:
    """The finished `partial` renamed to `out`, an existing `out` moved aside first."""
    if out.exists():
        from jft.training.outputs import free_name

        aside = free_name(out)
        shutil.move(str(out), aside)
        print(f"moved the existing {out} to {aside}", file=sys.stderr)
    partial.rename(out)
    print(f"wrote {out}", file=sys.stderr)


def _check_expressible(method: str, format: str) -> None:
    from jft.formats.peft_adapter import PEFT_METHODS

    mergeable = method not in UNMERGEABLE
    can = [f for f, ok in (("merged", mergeable), ("gguf", mergeable),
                           ("peft", method in PEFT_METHODS), ("jft", True)) if ok]
    if format not in can:
        raise JftError(f"--format {format} cannot express {method}; {method} exports as "
                       f"{' or '.join(can)}")


def _base_model(source: Path) -> str:
    """The base a run (its config.yaml), a jft adapter (its jft_adapter.json) or a PEFT
    adapter (its adapter_config.json) names."""
    from jft.formats import jft_adapter, peft_adapter

    if source.parent.name == "checkpoints":  # RUN/checkpoints/N
        source = source.parents[1]
    if (source / "config.yaml").is_file():
        try:
            value = yaml.safe_load((source / "config.yaml").read_text())["model"]
        except (yaml.YAMLError, KeyError, TypeError):
            value = None
        if value:
            return str(value)
    if jft_adapter.is_jft_adapter(source):
        if value := jft_adapter.read_jft_config(source).get("base_model"):
            return str(value)
    if peft_adapter.is_peft_adapter(source):
        return _peft_base_model(source)
    raise JftError(f"{source}: names no base model (no config.yaml 'model' or "
                   f"{jft_adapter.CONFIG_FILE} 'base_model'); give --model")


def _peft_base_model(source: Path) -> str:
    """A PEFT adapter's base_model_name_or_path, where jft has it: a local path (first, as
    transformers resolves it), or the hub id a bundled model was converted from."""
    from jft.formats.bundled import HUB_IDS, bundled_name
    from jft.formats.peft_adapter import CONFIG_FILE, read_peft_config

    value = read_peft_config(source).get("base_model_name_or_path")
    if isinstance(value, str) and value:
        if Path(value).exists():
            return value
        if bundled_name(value):
            return bundled_name(value)
    raise JftError(f"{source / CONFIG_FILE}: base_model_name_or_path {value!r} is neither a "
                   f"local path nor a bundled model's id ({', '.join(HUB_IDS.values())}); "
                   "give --model")


if __name__ == "__main__":
    sys.exit(run_cli(main))
