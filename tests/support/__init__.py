"""Test helpers: emulators and real servers started on loopback, shared as pytest fixtures."""
