"""The trust layer: site keys, sealed packages, the audit log, model signatures, provenance, AI-BOM."""
