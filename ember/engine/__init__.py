"""What one training run is made of below the Trainer: one optimizer step (`step.py`), the loss and
the chunked loss, micro-batching, the step guards, the run position, optimizers and schedulers,
preemption, the evaluation loop, and the checks made before the work they protect."""
