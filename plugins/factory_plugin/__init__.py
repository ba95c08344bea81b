"""The factory's Airflow plugin (name "factory").

Kept import-light: Airflow loads it in every process, so operators and gates live in their own
modules (`factory_plugin.approvals`, ...) that DAG files import, and the Data Docs app
(`factory_plugin.data_docs`) is built on its first request.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from factory_plugin.data_docs import URL_PREFIX, LazyApp


class FactoryPlugin(AirflowPlugin):
    name = "factory"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "Data Docs (compliance officers)"}]
