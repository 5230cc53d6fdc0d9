"""Training: config, optimizer, schedule, engine, checkpoints, distributed wrappers, run logging."""
