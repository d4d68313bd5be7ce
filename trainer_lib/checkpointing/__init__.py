"""Checkpoints: writing them, checking them, and resuming from them exactly."""
