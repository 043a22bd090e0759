"""The benchmark's pieces (not installed with the trainer): the shared job, the transformers Trainer + peft side, the memory probe."""
