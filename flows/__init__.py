"""Prefect flows and deployments, and the `cham` command line."""
