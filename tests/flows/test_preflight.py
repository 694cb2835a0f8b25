"""Fail fast: a bad path or option is refused before Prefect, Dask or torch are even imported.

The CLI is run as the operator runs it (a subprocess), and the subprocess reports which heavy modules it
had imported when it exited: none of prefect, distributed or torch may be loaded when validation fails.
(Speed is measured by benchmarks, not asserted: see benchmarks/RESULTS.md "Fail fast".)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from copgen import bundled
from copgen.flows import preflight
from copgen.flows.preflight import PreflightError

# Runs the CLI in-process inside a fresh interpreter, then prints which heavy modules were imported.
_PROBE = """
import sys
from copgen.flows.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("prefect", "distributed", "dask", "torch", "zarr", "pandas") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), "CODE=" + str(code), file=sys.stderr)
"""


def _cli(*args: str) -> tuple[int, str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "400"})
    last = proc.stderr.strip().splitlines()[-1]
    heavy = last.split("HEAVY=")[1].split(" ")[0]
    code = int(last.split("CODE=")[1])
    return code, " ".join(proc.stderr.split()), [h for h in heavy.split(",") if h]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from copgen.modalities import Modality
    from copgen.storage.majortom.writer import synthetic_records, write_dataset

    root = tmp_path_factory.mktemp("src")
    records = synthetic_records(Modality.DEM, ["1U_1R", "2U_1R"], thumbnail_size=8, seed=0)
    write_dataset(str(root), Modality.DEM, records)
    return root


def test_nonexistent_source_is_refused_before_anything_heavy_starts(tmp_path):
    code, err, heavy = _cli("complete", "--source", "/nonexistent", "--out", str(tmp_path / "o"))
    assert code == 2, err
    assert "error: Major TOM: no Core-* dataset with a metadata.parquet found under /nonexistent" in err
    assert heavy == [], f"imported before failing: {heavy}"


def test_bad_checkpoint_foreign_output_and_options_are_refused_early(tmp_path, world):
    junk = tmp_path / "net.safetensors"
    junk.write_bytes(b"junk")
    base = ["complete", "--source", str(world), "--out", str(tmp_path / "o")]
    code, err, heavy = _cli(*base, "--weights", str(junk))
    assert code == 2 and f"{junk} is neither a safetensors file nor a torch checkpoint" in err, err
    assert heavy == []
    code, err, heavy = _cli(*base, "--weights", str(tmp_path / "absent.pth"))
    assert code == 2 and f"cannot read {tmp_path / 'absent.pth'}: FileNotFoundError" in err, err
    foreign = tmp_path / "foreign"
    (foreign / "complete.zarr").mkdir(parents=True)
    (foreign / "complete.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                                      "attributes": {}}))
    code, err, heavy = _cli("loop", "--source", str(world), "--out", str(foreign))
    assert code == 2 and "complete.zarr is not a copgen cube" in err and heavy == [], err
    assert json.loads((foreign / "complete.zarr" / "zarr.json").read_text())["attributes"] == {}  # untouched
    for option, value, message in (("--dtype", "fp8", "--dtype 'fp8': choose one of"),
                                   ("--solver", "euler", "--solver 'euler': choose one of release, 2m"),
                                   ("--patches", "diag", "--patches 'diag'"),
                                   ("--cluster", "nowhere", "--cluster 'nowhere'"),
                                   ("--run-id", "../x", "invalid --run-id '../x'"),
                                   ("--generate", "S3", "--generate: unknown modality 'S3'"),
                                   ("--start", "yesterday", "--start 'yesterday': not an ISO date")):
        code, err, heavy = _cli(*base, option, value)
        assert code == 2 and message in err and heavy == [], (option, err)


def test_cluster_spec_loop_options_and_generate_inputs_are_refused_early(tmp_path, world):
    base = ["--source", str(world), "--out", str(tmp_path / "o")]
    spec = tmp_path / "absent.yaml"
    code, err, heavy = _cli("complete", *base, "--cluster", f"slurm:{spec}")
    assert code == 2 and f"--cluster slurm:{spec}: cannot read the cluster spec" in err and heavy == [], err
    for args, message in ((("--spec", "S2L2A>S3"), "loop spec 'S2L2A>S3': unknown modality 'S3'"),
                          (("--controls", "bogus"), "--controls: unknown control 'bogus'"),
                          (("--seed-policy", "often"), "'often' is not a valid SeedPolicy"),
                          (("-k", "0"), "--iterations 0: must be an integer >= 1")):
        code, err, heavy = _cli("loop", *base, *args)
        assert code == 2 and message in err and heavy == [], (args, err)
    code, err, heavy = _cli("generate", "--dem", str(tmp_path / "absent.tif"), "--out", str(tmp_path / "g"))
    assert code == 2 and f"--dem {tmp_path / 'absent.tif'}: no such file" in err and heavy == [], err


def test_train_source_and_checkpoints_are_refused_early(tmp_path, world):
    code, err, heavy = _cli("train", "--source", str(tmp_path / "absent"), "--out", str(tmp_path / "m"))
    assert code == 2 and f"--source {tmp_path / 'absent'}: no such file or folder" in err and heavy == [], err
    code, err, heavy = _cli("train", "--source", str(world), "--out", str(tmp_path / "m"),
                            "--network-init", str(tmp_path / "absent.safetensors"))
    assert code == 2 and "absent.safetensors: FileNotFoundError" in err and heavy == [], err
    assert not (tmp_path / "m").exists()


def test_loop_options_are_checked_as_the_job_checks_them():
    from copgen.flows.jobs import JobError, LoopJob

    for kwargs in ({"spec": "S2L2A"}, {"controls": "inject=x"}, {"carry": "pixels"}):
        options = {"spec": "S2L2A>S1RTC", "iterations": 2, "seed_policy": "fresh", "controls": "none",
                   "inject_p": 0.0, "carry": "image", **kwargs}
        with pytest.raises(PreflightError) as early:
            preflight.check_loop_options(**options)
        job = {**options, "controls": options["controls"]}
        with pytest.raises(JobError) as late:
            LoopJob(source=None, out=None, model=None, **job)
        assert str(early.value) == str(late.value)  # the same message before and after the heavy imports


def test_source_layout(tmp_path, world):
    assert preflight.check_source(str(world)) == ["Core-DEM"]
    (tmp_path / "Core-S1RTC").mkdir()
    (tmp_path / "Core-S1RTC" / "metadata.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PreflightError, match="Core-S1RTC, file .*parquet: unreadable metadata parquet"):
        preflight.check_source(str(tmp_path))
    with pytest.raises(PreflightError, match="no Core-\\* dataset"):
        preflight.check_source(str(tmp_path / "Core-S1RTC"))


def test_checkpoints(tmp_path):
    net, vae = bundled.paths()
    preflight.check_checkpoint(net)  # a real safetensors file passes
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes((1000).to_bytes(8, "little") + b'{"a": ' + b"x" * 2000)
    with pytest.raises(PreflightError, match="corrupted or truncated safetensors file"):
        preflight.check_checkpoint(str(truncated))
    zipped = tmp_path / "z.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 60)  # torch's zip format: the loader checks the rest
    preflight.check_checkpoint(str(zipped))


def test_output(tmp_path):
    from copgen.storage.cubes import Cube, CubeSpec

    Cube.create(str(tmp_path / "ours" / "complete.zarr"), CubeSpec(tile_size=8, iterations=2))
    preflight.check_output(str(tmp_path / "ours"))  # our own cube: resumable
    preflight.check_output(str(tmp_path / "new" / "deeper"))  # created
    assert (tmp_path / "new" / "deeper").is_dir() and not list((tmp_path / "new" / "deeper").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match="exists and is not a folder"):
        preflight.check_output(str(tmp_path / "file"))
    with pytest.raises(PreflightError, match="cannot write there"):
        preflight.check_output(str(tmp_path / "file" / "below"))
    (tmp_path / "odd" / "x.zarr").mkdir(parents=True)
    (tmp_path / "odd" / "x.zarr" / "data.bin").write_text("someone's")
    with pytest.raises(PreflightError, match="x.zarr is not a copgen cube"):
        preflight.check_output(str(tmp_path / "odd"))


def test_choices_mirror_the_modules_that_use_them():
    from copgen.diffusion import SOLVERS
    from copgen.flows.jobs import PATCH_MODES
    from copgen.flows.models import DTYPES

    assert set(preflight.SOLVERS) == set(SOLVERS)
    assert set(preflight.PATCH_MODES) == set(PATCH_MODES)
    assert set(preflight.DTYPES) == set(DTYPES) | {"auto"}
