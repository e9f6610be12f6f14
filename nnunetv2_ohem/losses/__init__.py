"""Losses building blocks (pure modules: nothing here imports a trainer)."""
