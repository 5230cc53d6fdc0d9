"""Tasks: supervised training, fine-tuning, SimMIM pre-training and evaluation, each a ``main``."""
