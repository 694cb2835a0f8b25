"""Get the released weights to the workers: fetch them once into a shared store, read them from there.

Every Dask worker loads its checkpoints through fsspec (``--weights s3://bucket/models/...``), so the
weights only have to be somewhere all workers can read: a bucket, or a volume mounted on every worker.
This copies the release files there once (``python -m copgen.flows.weights --to s3://bucket/models``;
infra/k8s/weights-job.yaml, the ``weights`` service of infra/compose.yaml), writing each file under a
temporary name first, so a worker never reads a half-copied checkpoint, and skipping files already there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

import fsspec
from copgen.storage.fsutil import join_url

# The COP-GEN-Beta release (network EMA weights at step 114k and the SD KL-f8 autoencoder).
RELEASE = {
    "nnet_ema_114000.pth": "hf://mespinosami/COP-GEN-Beta/nnet_ema_114000.pth",
    "autoencoder_kl.pth": "hf://mespinosami/COP-GEN-Beta/autoencoder_kl.pth",
}
_CHUNK = 16 << 20


def fetch(dest: str, sources: dict[str, str] | None = None,
          storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Copy each ``name -> source URL`` to ``dest/name`` unless a file of the same size is there. Returns
    per file its URL, size, sha256 (of the copied bytes; None when skipped) and whether it was copied."""
    so = dict(storage_options or {})
    out: dict[str, dict[str, Any]] = {}
    for name, src in (sources or RELEASE).items():
        target = join_url(dest, name)
        src_fs, src_path = fsspec.core.url_to_fs(src)
        dst_fs, dst_path = fsspec.core.url_to_fs(target, **so)
        size = src_fs.size(src_path)
        if dst_fs.exists(dst_path) and dst_fs.size(dst_path) == size:
            out[name] = {"url": target, "size": size, "sha256": None, "copied": False}
            continue
        digest = hashlib.sha256()
        partial = dst_path + ".partial"
        dst_fs.makedirs(dst_fs._parent(dst_path), exist_ok=True)
        with src_fs.open(src_path, "rb") as fin, dst_fs.open(partial, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
        dst_fs.mv(partial, dst_path)
        out[name] = {"url": target, "size": size, "sha256": digest.hexdigest(), "copied": True}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m copgen.flows.weights",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--to", required=True, help="shared folder or URL, e.g. s3://bucket/models")
    parser.add_argument("--source", action="append", metavar="NAME=URL",
                        help="a file to fetch instead of the release (repeatable)")
    args = parser.parse_args(argv)
    sources = None
    if args.source:
        sources = {}
        for item in args.source:
            name, sep, url = item.partition("=")
            if not sep or not name or "/" in name:
                parser.error(f"--source {item!r}: expected NAME=URL with a plain file name")
            sources[name] = url
    try:
        result = fetch(args.to, sources)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover - the module's command line
    sys.exit(main())
