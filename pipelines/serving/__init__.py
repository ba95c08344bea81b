"""Continuous operations at a site: the inference service (`factory serve`), ODD checks, the bounded
input store, and drift detection that triggers the site's local-only retraining."""
