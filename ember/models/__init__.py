"""What the Trainer does to the model before training: adapters checks, activation checkpointing,
compilation (`pipeline.py`), NEFTune noise (`neftune.py`), and the checks of their arguments."""
