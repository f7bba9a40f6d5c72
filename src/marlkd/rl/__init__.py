"""Reinforcement learning for teachers, baselines and kickstarting."""
