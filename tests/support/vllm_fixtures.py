"""Pytest fixtures: real vLLM CPU server fixtures (serving)."""
