"""Rebound: tasks."""
