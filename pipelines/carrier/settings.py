"""Carrier settings of a site: `carrier:` in conf/sites.yaml, with per-deployment overrides from the
environment (the Helm chart sets these; see charts/sovereign-factory/templates/inbox/):

- `FACTORY_PARTNER_INBOX_<SITE>`: where `<SITE>`'s inbox service is reached (`inbox_url`);
- `FACTORY_AIRFLOW_URL_<SITE>`, else `FACTORY_AIRFLOW_URL`: the site's own Airflow API (`airflow_url`);
- `FACTORY_INBOX_MAX_PACKAGE_BYTES`: the largest package the inbox accepts (`max_package_bytes`);
- `FACTORY_AIRFLOW_USERNAME` and `FACTORY_AIRFLOW_PASSWORD`: the inbox's Airflow service account
  (read by `events`; without them, `airflow_user` and the site's `airflow/passwords.json`).
"""

from __future__ import annotations

import os

from pydantic import ValidationError

from pipelines.config import Carrier, load_config
from pipelines.workspace import check_site

AIRFLOW_URL_ENV = "FACTORY_AIRFLOW_URL"
MAX_PACKAGE_ENV = "FACTORY_INBOX_MAX_PACKAGE_BYTES"


class CarrierError(RuntimeError):
    """The carrier cannot do what was asked (bad settings, unusable outbox); the message says why."""


def inbox_url_env(site: str) -> str:
    return f"FACTORY_PARTNER_INBOX_{site.upper()}"


def airflow_url_env(site: str) -> str:
    return f"{AIRFLOW_URL_ENV}_{site.upper()}"


def carrier_settings(site: str) -> Carrier:
    """The carrier settings of `site`, with the environment's overrides applied (and validated)."""
    configured = load_config().sites[check_site(site)].carrier
    sources = {"inbox_url": [inbox_url_env(site)], "airflow_url": [airflow_url_env(site), AIRFLOW_URL_ENV],
               "max_package_bytes": [MAX_PACKAGE_ENV]}
    overrides = {}
    for field, names in sources.items():
        if value := next((os.environ[name] for name in names if os.environ.get(name)), None):
            overrides[field] = value
    if not overrides:
        return configured
    try:
        return Carrier.model_validate(configured.model_dump() | overrides)
    except ValidationError as error:
        raise CarrierError(f"carrier settings of {site} are not valid (environment overrides "
                           f"{', '.join(sorted(overrides))}): {error}") from None
