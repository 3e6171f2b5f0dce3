"""Checkpoint surgery and diagnostics."""
