"""Vendored STAC extension JSON schemas (see README.md); read with importlib.resources."""
