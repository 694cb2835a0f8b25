"""COP-GEN-Beta: the model and the science (pure torch/numpy; knows nothing of files, Prefect or Dask)."""

__version__ = "0.1.0"
