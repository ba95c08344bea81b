"""Data: the real-data builder, schemas, the site data catalog, sanitization, validation, lineage."""
