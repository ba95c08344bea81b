"""Model-protection steps: screening received contributions for poisoning before training."""

from __future__ import annotations
