"""The carrier: how sealed packages travel from a sender's outbox to the recipient's inbox.

A site writes what it sends only into its own `outbox/` (`outbox`), with a delivery record per
package. Two carriers move them:

- `https` (the default between machines): `push` sends each pending package to the recipient's
  inbox service (`inbox_service`) over mutual TLS 1.3, each side pinning the other's site key
  (`tls`: a site's TLS certificate carries its current signing key).
- `media` (air-gapped partners): `media.export_media` writes the pending packages with a signed
  manifest to removable media, `media.import_media` checks the whole medium before taking any of it.

Both end in `receipt.receive`, the single place where a package enters a site: envelope checks,
atomic and idempotent storage in `inbox/`, an audit entry, and the asset event posted to the site's
own Airflow (`airflow_events`). Delivery is at-least-once; receipt is idempotent by package id.
"""
