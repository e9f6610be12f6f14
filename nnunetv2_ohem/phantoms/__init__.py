"""Synthetic lesion phantoms for the demo and the tests."""
