"""Tasks: supervised training, fine-tuning and SimMIM pre-training (each a ``main(cfg)``), and evaluation."""
