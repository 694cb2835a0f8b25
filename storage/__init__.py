"""Everything that touches bytes: fsspec URLs, parquet, images, Zarr."""

import fsspec as _fsspec

# s3:// and s3a:// open copgen's S3 filesystem: s3fs under one visible, bounded retry policy
# (storage/retry.py). By name, so s3fs is imported only when an S3 URL is first opened (by class
# if s3fs was opened before us).
for _protocol in ("s3", "s3a"):
    if _protocol in _fsspec.registry:
        from copgen.storage.retry import RetryingS3FileSystem as _S3

        _fsspec.register_implementation(_protocol, _S3, clobber=True)
    else:
        _fsspec.register_implementation(_protocol, "copgen.storage.retry.RetryingS3FileSystem", clobber=True)
