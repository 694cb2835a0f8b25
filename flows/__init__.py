"""Orchestration: Prefect flows and tasks, Dask clusters, deployments, reports, the CLI."""
