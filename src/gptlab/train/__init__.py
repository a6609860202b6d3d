"""Training: optimizers, schedules, checkpoints, callbacks and the trainer loop."""
