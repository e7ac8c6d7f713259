"""Training runs: the typed config, data reading and batching, the (sharded) training step,
run checkpoints and what a run writes. The objectives a step minimises are in
`jft.objectives`; the CLI is `python -m jft.train`."""
