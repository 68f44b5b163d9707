"""Rebound: flows."""
