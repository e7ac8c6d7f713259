"""`python -m jft.serve`: an OpenAI-compatible server of one base model and many adapters.

`batch.py` is the device side (the cache's slots, the adapter banks, the programs),
`adapters.py` what is held where, `engine.py` the continuous-batching loop, `app.py` the
HTTP API, `metrics.py` what /metrics reports; docs/serving.md says how to use it.
"""
