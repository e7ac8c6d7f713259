"""Files in and out: reading safetensors and GGUF checkpoints into params (`loading`), the
bundled models, exporting merged HF directories and GGUF files, and adapters in PEFT's
format and jft's own. Pickle-based checkpoints are never read."""
