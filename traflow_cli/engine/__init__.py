"""Method-agnostic runtime: devices, DDP, the step loop, checkpoints, EMA, progress, records."""
