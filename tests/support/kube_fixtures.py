"""Pytest fixtures: kmock Kubernetes emulator and Job-controller fixtures (operator)."""
