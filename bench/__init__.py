"""Rebound: bench."""
