"""Errors raised in Dask workers reach the driver intact (message and attributes), never as TypeError."""

import pickle

import pytest
from copgen.checkpoints import CheckpointError
from copgen.metrics.errors import MetricInputError
from copgen.storage.majortom.reader import SourceError
from copgen.storage.majortom.thumbnails import ThumbnailError
from copgen.storage.majortom.writer import RecordError


@pytest.mark.parametrize("exc", [
    MetricInputError("generated", "needs at least 4 samples, got 2", "modality DEM"),
    SourceError("unreadable", dataset="Core-S2L2A", file="part_00001.parquet", row_group=3, cell="1U_2R",
                field="thumbnail"),
    RecordError("Core-DEM", "1U_2R", "thumbnail", "wrong size"),
    ThumbnailError("corrupt bytes", {"dataset": "Core-S1RTC", "cell": "1U_2R"}),
    CheckpointError("sha256 mismatch", source="s3://bucket/net.pth"),
])
def test_worker_errors_survive_pickling(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.__dict__ == exc.__dict__
