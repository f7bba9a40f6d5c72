"""Distillation: losses, datasets, the DAgger loop and the trainer."""
