"""Exports of pruned models to the formats other runtimes load."""
