"""Datasets, transforms and loaders for training, evaluation and prediction."""
