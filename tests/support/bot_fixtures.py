"""Pytest fixtures: Bolt app fixtures (bot)."""
