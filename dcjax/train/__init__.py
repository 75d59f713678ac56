"""Training: optimiser, sharded train state, jitted step, checkpoints, metrics, the loop."""
