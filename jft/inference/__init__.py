"""Inference: batched generation with a KV cache, adapters applied unmerged."""
