"""The `factory` command. Each area keeps its commands in its own module; they load on first use."""

from __future__ import annotations

import importlib

import click

from pipelines import __version__

# command name -> "module:attribute"; loading lazily keeps `factory --help` fast (no torch import).
COMMANDS = {
    "init": "pipelines.init:init_command",
    "step": "pipelines.steps.cli:step_command",
    "run": "pipelines.orchestration:run_command",
    "report": "pipelines.report:report_command",
    "package": "pipelines.trust.cli:package",
    "keys": "pipelines.trust.cli:keys",
    "audit": "pipelines.trust.cli:audit",
    "outbox": "pipelines.carrier.cli:outbox",
    "inbox": "pipelines.carrier.cli:inbox",
    "transfer": "pipelines.carrier.cli:transfer",
    "policy": "pipelines.policy.cli:policy",
    "data": "pipelines.data.cli:data",
    "lineage": "pipelines.data.cli:lineage",
    "approve": "pipelines.service.approvals:approve_command",
    "approvals": "pipelines.service.approvals:approvals_command",
    "up": "pipelines.service.up:up_command",
    "down": "pipelines.service.up:down_command",
    "bundle": "pipelines.runtime.bundle:bundle_command",
    "serve": "pipelines.serving.cli:serve",
    "drift": "pipelines.serving.cli:drift",
    "watermark": "pipelines.protection.cli:watermark",
    "contribution": "pipelines.service.contribution:contribution",
    "privacy": "pipelines.protection.membership_cli:privacy",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="factory")
def main() -> None:
    """Sovereign AI Factory: three sites improve one model family, each keeping its data."""


if __name__ == "__main__":
    main()
