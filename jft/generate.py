"""`python -m jft.generate --model M --prompt TEXT`: prints the completion and nothing else."""

from __future__ import annotations

import argparse
import sys

from jft.errors import JftError, run_cli


class ArgumentParser(argparse.ArgumentParser):
    """argparse for jft's CLIs: a bad flag is one JftError line instead of usage text, and
    `--debug` (which `run_cli` takes out of argv before parsing) is listed in --help."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str):
        raise JftError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m jft.generate",
        description="Generate a completion with a bundled model, an HF directory or a .gguf file.",
    )
    parser.add_argument("--model", required=True,
                        help="bundled name (smollm2-135m-instruct, gemma3-270m), HF dir or .gguf")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as one user turn with the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="0 switches top-k off (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="1.0 switches top-p off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="params dtype: float32, bfloat16, or "
                        "auto, float32 on CPU and bfloat16 on GPU/TPU (default: %(default)s)")
    parser.add_argument("--adapter", help="a jft.train run directory (its latest adapter), a "
                        "PEFT adapter or a jft adapter directory")
    parser.add_argument("--continual", metavar="RUN",
                        help="a jft.continual run directory: its strategy's adapters (dynamic "
                        "ConPET routes the prompt to a task adapter with its selector)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import jft
    from jft.inference.generation import Sampling

    if args.max_new_tokens < 1:
        raise JftError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as error:
        raise JftError(f"bad sampling flag: {error}") from None
    adapter = args.adapter
    if adapter is not None:  # before the model loads, which takes a while
        from jft.formats.adapters import check_adapter_exists

        check_adapter_exists(adapter, "--adapter")
    if args.continual is not None:
        from jft.continual.inference import RESULTS_FILE, is_continual_run

        if adapter is not None:
            raise JftError("give --adapter or --continual, not both")
        if not is_continual_run(args.continual):
            raise JftError(f"--continual {args.continual}: no {RESULTS_FILE} there; give a "
                           "python -m jft.continual run directory")
        adapter = args.continual
    model = jft.load(args.model, dtype=args.dtype, adapter=adapter)
    text = model.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    sys.stdout.write(text.strip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
