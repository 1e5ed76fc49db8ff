"""Prefect flows: compress, evaluate, promote; and the CLI that runs them."""
