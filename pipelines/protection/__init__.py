"""Model protection: watermarks that identify a recipient, robustness at release, screening of
received contributions for poisoning, and extraction detection at serving (issue 18)."""

from __future__ import annotations

from typing import Any


def settings(section: str) -> dict[str, Any]:
    """`conf/protection.yaml`'s `section` (watermark, robustness, screening, extraction); {} when absent."""
    from pipelines.config import read_yaml

    return dict(read_yaml("protection.yaml").get(section) or {})
