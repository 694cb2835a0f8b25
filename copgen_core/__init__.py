"""COP-GEN-Beta: the model and the science (pure torch/numpy; knows nothing of files, Prefect or Dask)."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version, recorded in provenance ("unknown" in a bare checkout)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("copgen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
