"""Everything that touches bytes: fsspec URLs, parquet, images, Zarr."""
