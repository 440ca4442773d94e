"""Pytest fixtures: tiny model and trained adapter fixtures (training)."""
