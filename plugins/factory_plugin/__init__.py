"""The factory's Airflow plugin (name "factory").

Kept import-light: Airflow loads it in every process, so operators and gates live in their own
modules (`factory_plugin.approvals`, ...) that DAG files import.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class FactoryPlugin(AirflowPlugin):
    name = "factory"
