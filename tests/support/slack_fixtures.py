"""Pytest fixtures: Slack Web API emulator fixtures (ingestion)."""
