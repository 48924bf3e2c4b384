"""Datasets: the RecDataset, readers, the leave-one-out split and the built-in generator."""
