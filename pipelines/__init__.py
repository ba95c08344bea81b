"""Sovereign AI Factory: step logic and the `factory` CLI."""

__version__ = "0.1.0"
