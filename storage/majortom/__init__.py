"""Major TOM Core datasets: the grid, thumbnails, the published parquet layout (read and write)."""
