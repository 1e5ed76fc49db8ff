"""Prefect tasks: thin, cached wrappers over prunecomp that exchange URIs, hashes and small dicts."""
