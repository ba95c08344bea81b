"""What a step receives and how it refuses: `StepContext` and `StepError`.

A leaf module, so the data, trust and serving layers can raise `StepError`
without importing the step registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.workspace import SitePaths


class StepError(RuntimeError):
    """A step refused or failed a quality bar; the message names the bar."""


@dataclass(frozen=True)
class StepContext:
    site: str
    paths: SitePaths
    run_id: str = "manual"
    dag_id: str = "manual"
    actor: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_site(cls, site: str, **kwargs: Any) -> StepContext:
        return cls(site=site, paths=SitePaths.of(site), **kwargs)
