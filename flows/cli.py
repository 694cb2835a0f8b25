"""The ``copgen`` command line: complete, loop, report, inspect, export, generate, world, train, deploy, demo."""

from __future__ import annotations

import os

# Quiet by default (pipeline-stack.md §2.5.5): distributed's INFO lines otherwise flood the terminal.
# Set before Prefect/Dask are imported; ``--verbose`` turns them back on.
os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
from copgen.flows.prefect_api import quiet_defaults  # noqa: E402 - imports no Prefect

quiet_defaults()  # the Prefect start timeout (90 s) and friends must be set before Prefect is imported

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import copgen  # noqa: E402
import typer  # noqa: E402
from copgen.flows.defaults import DEFAULT_SOLVER, DEFAULT_STEPS  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

# zarr lists a cube's prefix when consolidating and notes the ledger/plan objects we keep there on purpose
warnings.filterwarnings("ignore", message="Object at _(ledger|plan) is not recognized")

app = typer.Typer(
    help="COP-GEN-Beta pipeline: fill missing Copernicus modalities, run self-loop studies, write cubes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # plain click help: wraps at any width, keeps <placeholders> and [brackets]
)
console = Console(stderr=True)
EXIT_QUARANTINED = 3


def _print_version(value: bool) -> None:
    if value:
        typer.echo(copgen.__version__)
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the package version and exit.")] = False,
) -> None:
    pass

# ---- shared options ------------------------------------------------------------------------------------

Source = Annotated[str, typer.Option(
    "--source", "-s", help="Major TOM Core source: a folder/URL holding `Core-*` datasets "
    "(local, `s3://bucket/prefix`, `hf://datasets/Major-TOM`). Example: `--source ./world`")]
Out = Annotated[str, typer.Option(
    "--out", "-o", help="Output folder/URL for cubes, tables and the report. Example: `--out s3://bucket/run1`")]
Weights = Annotated[str, typer.Option(
    help="Network checkpoint: `bundled` (the small demo model), a path, `s3://…` or `hf://…` "
    "(`.safetensors` or `.pth`, loaded safely). Example: "
    "`--weights hf://mespinosami/COP-GEN-Beta/nnet_ema_114000.pth`")]
Vae = Annotated[str, typer.Option(
    help="Autoencoder checkpoint (SD KL-f8 in LDM or diffusers layout), as `--weights`. Example: "
    "`--vae hf://mespinosami/COP-GEN-Beta/autoencoder_kl.pth`")]
Cluster = Annotated[str, typer.Option(
    help="`local` (CPU worker processes), `local-cuda` (one worker per GPU), `slurm:spec.yaml` (dask-jobqueue "
    "worker jobs; infra/slurm/cluster-spec.yaml) or a scheduler address. Example: `--cluster tcp://scheduler:8786`")]
Workers = Annotated[int | None, typer.Option(help="Worker processes for `--cluster local` (default: min(4, cores)).")]
Steps = Annotated[int, typer.Option(
    help="Network evaluations per sample. The default (`--solver 2m --steps 10`) measured equal to the "
    "release's 50 steps on held-out cells (benchmarks/RESULTS.md); the release setting: "
    "`--solver release --steps 50`.")]
Solver = Annotated[str, typer.Option(
    help="`2m` (multistep DPM-Solver++(2M), the default) or `release` (singlestep order 3, the release's "
    "sampler; with `--steps 50` the release's exact setting).")]
Dtype = Annotated[str, typer.Option(
    help="`float32`, `bfloat16` (autocast) or `auto`: bf16 on CUDA, and on CPUs with native bf16 (AMX, "
    "AVX512-BF16) where its quality was measured equal (benchmarks/RESULTS.md); float32 otherwise.")]
Device = Annotated[str, typer.Option(help="`auto`, `cpu`, `cuda` or `cuda:N` (per worker).")]
BatchSize = Annotated[int, typer.Option(help="Samples per network batch (padded: results never depend on it).")]
BlockSamples = Annotated[int, typer.Option(help="Samples per work block (one Prefect task each).")]
Patches = Annotated[str, typer.Option(help="`center` (the 256 px centre crop) or `grid` (all 4x4 patches).")]
Seed = Annotated[int, typer.Option("--seed", help="Run seed; every sample's seed derives from it and its cell.")]
StorageOpt = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="fsspec option KEY=VALUE for s3:// (repeatable). Credentials are refused here "
    "(they would be stored with the run): use the environment (`AWS_*`), a profile or a Prefect Secret "
    "block. Example: `--storage-option endpoint_url=http://127.0.0.1:9000`")]
AllowPartial = Annotated[bool, typer.Option(
    help="Exit 0 even when samples were quarantined (default: exit 3 so schedulers notice).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect and Dask logs.")]


# Storage options that carry credentials: refused on the command line, because options become flow-run
# parameters (stored in clear in Prefect's database, shown in its UI) and travel with every task.
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "signature")


def _is_secret_option(key: str) -> bool:
    k = key.lower()
    return k == "key" or k.endswith(("_key", "_key_id")) or any(w in k for w in _SECRET_WORDS)


def _storage_options(items: list[str] | None) -> dict[str, Any]:
    so: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{item.split(':', 1)[0][:40]!r}: expected KEY=VALUE",
                                     param_hint="--storage-option")
        key, value = item.split("=", 1)
        if _is_secret_option(key):  # the value is never echoed
            raise typer.BadParameter(
                f"{key!r} looks like a credential and is refused on the command line (it would be stored "
                "with the run's parameters); give credentials through the environment (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), a profile (`--storage-option profile=NAME`) or, "
                "for deployments, a Prefect Secret block read by the worker", param_hint="--storage-option")
        if key == "endpoint_url":  # s3fs takes the endpoint inside client_kwargs
            so.setdefault("client_kwargs", {})["endpoint_url"] = value
        else:
            so[key] = json.loads(value) if value in ("true", "false") else value
    return so


_VERBOSE = False


def _verbose(on: bool) -> None:
    global _VERBOSE
    _VERBOSE = on
    if on:
        logging.getLogger("prefect").setLevel(logging.INFO)
        logging.getLogger("distributed").setLevel(logging.INFO)
    logging.getLogger("copgen").setLevel(logging.INFO if on else logging.WARNING)


def _quiet_run_loggers() -> None:
    """Prefect logs a failed run's traceback at ERROR; the CLI reports the error itself (one clear line,
    exit 2), so in quiet mode those run loggers only speak for CRITICAL. ``--verbose`` keeps them."""
    if not _VERBOSE:
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
            # worker processes started after this (local clusters) configure Prefect logging from the env
            os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_{name.upper().replace('.', '_')}_LEVEL", "CRITICAL")


class _Progress:
    """Samples written, block by block (the flows call start/advance): a bar on a terminal, plain lines
    (blocks done/total, samples/s, ETA) through a pipe or in a scheduler's log."""

    def __init__(self, label: str) -> None:
        from copgen.flows.runtime import ProgressMeter

        self.label = label
        self.plain = not console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("samples"), TimeElapsedColumn(), console=console, transient=False)
        self.task = None
        self.meter: ProgressMeter | None = None
        self._meter_type = ProgressMeter

    def start(self, blocks: int, samples: int) -> None:
        if self.plain:
            self.meter = self._meter_type(blocks, samples)
            self._line(f"{self.label}: {blocks} blocks, {samples} samples to generate")
            return
        self.bar.start()
        self.task = self.bar.add_task(f"{self.label}: {blocks} blocks", total=samples)

    def advance(self, result: dict) -> None:
        if self.meter is not None:
            self.meter.advance(result.get("samples", 0))
            self._line(f"{self.label}: {self.meter.line()}")
        elif self.task is not None:
            self.bar.advance(self.task, result.get("samples", 0))

    def stop(self) -> None:
        if self.task is not None:
            self.bar.stop()

    @staticmethod
    def _line(text: str) -> None:
        # not print(): the flows run with log_prints=True, which would route it into the run's log
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _run_flow(label: str, address_cluster: str, workers: int | None, body, **kwargs) -> dict[str, Any]:
    """Start the API and the cluster, run ``body`` as a flow on it with a progress bar."""
    from copgen.flows.clusters import ClusterError, open_cluster, parse_cluster, task_runner
    from copgen.flows.prefect_api import prefect_api
    from copgen.flows.runtime import reporting_progress
    from prefect import flow

    _quiet_run_loggers()
    try:
        spec = parse_cluster(address_cluster, n_workers=workers)
    except ClusterError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cluster") from None
    if not _VERBOSE:  # the driver reports; local workers keep quiet about their own shutdown
        spec = dataclasses.replace(spec, worker_log_level=logging.CRITICAL)
    with prefect_api(), open_cluster(spec) as (address, link):
        if link:
            console.print(f"Dask dashboard: {link}")
        runner = flow(name=label, task_runner=task_runner(address), log_prints=True)(body)
        with reporting_progress(_Progress(label)):
            return runner(address=address, **kwargs)


def _plain(value: Any) -> str:
    """A summary value for people: mappings as ``key: value`` lines, lists comma-separated."""
    if isinstance(value, dict):
        return "\n".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "\n".join(_plain(v) for v in value) if any(isinstance(v, dict) for v in value) else (
            ", ".join(str(v) for v in value) or "—")
    return "—" if value is None else str(value)


def _summary_table(summary: dict[str, Any], title: str = "summary") -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # paths wrap whole, never cut with "…"
    for key, value in summary.items():
        table.add_row(key.replace("_", " "), _plain(value))
    return table


def _finish(summary: dict[str, Any], allow_partial: bool, as_json: bool) -> None:
    text = {k: v for k, v in summary.items() if k != "quarantine"}
    if as_json:
        typer.echo(json.dumps(summary, indent=1, default=str))
    else:
        console.print(_summary_table(text))
    bad = summary.get("quarantined", 0)
    if bad:
        console.print(f"[yellow]{bad} sample(s) quarantined[/]: `copgen inspect` lists them with reasons.")
        if not allow_partial:
            raise typer.Exit(EXIT_QUARANTINED)


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a command hands to ``_fail``: everything; ``_fail`` re-raises what is not a reportable failure
    (``copgen.flows.failures``: exactly CopgenError and its translations), so bugs keep their traceback."""
    return (Exception,)


def _preflight(source: str, out: str, weights: str, vae: str, so: dict[str, Any], *, dtype: str, solver: str,
               steps: int, batch_size: int, loop_options: dict[str, Any] | None = None,
               **run_options: Any) -> None:
    """Fail fast (flows/preflight.py): options, source, checkpoints and output are checked before the heavy
    imports and before Prefect or Dask start; a bad one is the usual one-line error, exit 2."""
    from copgen import bundled
    from copgen.flows import preflight

    try:
        preflight.check_model_options(dtype, solver, steps, batch_size)
        preflight.check_run_options(**run_options)
        if loop_options is not None:
            preflight.check_loop_options(**loop_options)
        preflight.check_source(source, so)
        for url in (weights, vae):
            if url == "bundled":
                bundled.paths()
            else:
                preflight.check_checkpoint(url, so)
        preflight.check_output(out, so)
    except (preflight.PreflightError, FileNotFoundError) as exc:
        _fail(exc)


def _preflight_train(source: str, checkpoints: dict[str, str | None], so: dict[str, Any]) -> None:
    """``copgen train``'s fail-fast checks: the source exists, given checkpoints are readable (exit 2)."""
    from copgen.flows import preflight

    try:
        preflight.check_exists("--source", source, so)
        for url in checkpoints.values():
            if url and url != "bundled":
                preflight.check_checkpoint(url, so)
    except (preflight.PreflightError, FileNotFoundError) as exc:
        _fail(exc)


def _preflight_generate(given: dict[str, str], weights: str, vae: str, so: dict[str, Any], *, dtype: str,
                        solver: str, steps: int, batch_size: int) -> None:
    """``copgen generate``'s fail-fast checks: model options, input images and checkpoints (exit 2)."""
    from copgen import bundled
    from copgen.flows import preflight

    try:
        preflight.check_model_options(dtype, solver, steps, batch_size)
        preflight.check_inputs({f"--{m.lower()}": p for m, p in given.items()}, so)
        for url in (weights, vae):
            if url == "bundled":
                bundled.paths()
            else:
                preflight.check_checkpoint(url, so)
    except (preflight.PreflightError, FileNotFoundError) as exc:
        _fail(exc)


def _fail(exc: BaseException) -> None:
    """One line and a hint, exit with the error's code (``copgen.flows.failures``); ``--verbose`` adds the
    traceback. Not a reportable failure: re-raised as it is."""
    from copgen.flows.failures import HINTS, classify, signal_exit_code

    if signal_exit_code(exc) is not None:  # a signal, however wrapped: main() reports it (130/143)
        raise exc
    err = classify(exc)
    if err is None:
        raise exc
    if _VERBOSE:
        console.print_exception(show_locals=False)
    code = int(getattr(err, "exit_code", 2))
    # soft_wrap: the error stays one line whatever the terminal's width (grep-able in batch logs)
    console.print(f"[red]error:[/] {_escape(err)}", soft_wrap=True)
    hint = getattr(err, "hint", None) or HINTS.get(code)
    if hint:
        console.print(f"hint: {_escape(hint)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _escape(text: object) -> str:
    from rich.markup import escape

    return escape(str(text))


# ---- commands ------------------------------------------------------------------------------------------


@app.command()
def complete(
    source: Source,
    out: Out,
    weights: Weights = "bundled",
    vae: Vae = "bundled",
    cluster: Cluster = "local",
    workers: Workers = None,
    generate: Annotated[str, typer.Option(
        help="`missing` (every absent modality) or a list. Example: `--generate S1RTC,DEM`")] = "missing",
    regenerate_present: Annotated[bool, typer.Option(
        help="Also generate the `--generate` modalities where they exist (augmentation corpora).")] = False,
    samples_per_cell: Annotated[int, typer.Option(
        help="Seeds per (cell, patch): N variants for augmentation. Example: `--samples-per-cell 4`")] = 1,
    patches: Patches = "center",
    steps: Steps = DEFAULT_STEPS,
    solver: Solver = DEFAULT_SOLVER,
    dtype: Dtype = "float32",
    device: Device = "auto",
    batch_size: BatchSize = 16,
    block_samples: BlockSamples = 32,
    seed: Seed = 0,
    bbox: Annotated[str | None, typer.Option(
        help="min_lon,min_lat,max_lon,max_lat on cell centres. Example: `--bbox 8,45.5,9.5,46.5`")] = None,
    start: Annotated[str | None, typer.Option(help="Earliest acquisition (ISO date). Example: `2020-01-01`")] = None,
    end: Annotated[str | None, typer.Option(help="Latest acquisition (ISO date).")] = None,
    max_cloud_cover: Annotated[float | None, typer.Option(help="Max S2 cloud cover in percent.")] = None,
    save_latents: Annotated[bool, typer.Option(help="Also store float16 latents in the cube.")] = False,
    run_id: Annotated[str | None, typer.Option(help="Name of this run (default: complete-<time>-<hex>).")] = None,
    invalid_rows: Annotated[str, typer.Option(
        help="A metadata row the reader rejects (broken grid_cell, NaN centre, ...): `quarantine` (default: "
        "its cell is held back and recorded, exit 3) or `missing` (treat the modality as absent and generate "
        "it; recorded in the run's provenance). Example: `--invalid-rows missing`")] = "quarantine",
    retry_quarantined: Annotated[bool, typer.Option(
        help="Re-read the samples quarantined by earlier runs (after fixing the source).")] = False,
    storage_option: StorageOpt = None,
    allow_partial: AllowPartial = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Fill the missing modalities of Major TOM cells: every real modality of a sample conditions the missing
    ones. Writes `<out>/complete.zarr` (iteration 0 = inputs, 1 = completed; `origin` says real/generated)
    and `<out>/tables/provenance`. Re-running adds only new cells and resumes unfinished blocks.

    \b
    Example: copgen complete --source ./world --out ./completed   (release sampler: --solver release --steps 50)
    \f
    Long by its signature: each parameter is one command-line option (typer reads them from here); the
    body checks them and maps them to the job in one call.
    """
    _verbose(verbose)
    so = _storage_options(storage_option)
    try:
        box = tuple(float(v) for v in bbox.split(",")) if bbox else None
    except ValueError as exc:
        _fail(exc)
    if box is not None and len(box) != 4:
        raise typer.BadParameter("expected 4 numbers", param_hint="--bbox")
    _preflight(source, out, weights, vae, so, dtype=dtype, solver=solver, steps=steps, batch_size=batch_size,
               patches=patches, cluster=cluster, workers=workers, block_samples=block_samples, run_id=run_id,
               generate=generate, bbox=box, dates=(("--start", start), ("--end", end)))
    from copgen.flows.complete import run_complete
    from copgen.flows.jobs import CompleteJob

    try:
        job = CompleteJob.from_options(
            source=source, out=out, weights=weights, vae=vae, generate=generate,
            regenerate_present=regenerate_present, patches=patches, samples_per_cell=samples_per_cell,
            steps=steps, solver=solver, dtype=dtype, device=device, batch_size=batch_size,
            block_samples=block_samples, run_seed=seed, run_id=run_id, bbox=box, start=start, end=end,
            max_cloud_cover=max_cloud_cover, save_latents=save_latents, storage_options=so,
            invalid_rows=invalid_rows, retry_quarantined=retry_quarantined)
        summary = _run_flow("complete", cluster, workers, run_complete, job=job)
    except _user_errors() as exc:
        _fail(exc)
    _finish(summary, allow_partial, as_json)


@app.command()
def loop(
    source: Source,
    out: Out,
    weights: Weights = "bundled",
    vae: Vae = "bundled",
    spec: Annotated[str, typer.Option(
        help="Modalities the chain walks (quote it: `>` redirects in a shell): 'S2L2A>S1RTC' alternates, "
        "'S2L2A>S1RTC>DEM>S2L2A' cycles; several loops comma-separated ('S2L2A>S2L1C,S2L2A>S1RTC'), the "
        "controls run on the first.")]
    = "S2L2A>S1RTC",
    iterations: Annotated[int, typer.Option("--iterations", "-k", help="K, the number of loop iterations.")] = 5,
    seed_policy: Annotated[str, typer.Option(
        help="`fresh` (new seed each iteration: a Gibbs-like chain) or `fixed` (a deterministic map).")]
    = "fresh",
    controls: Annotated[str, typer.Option(
        help="Extra curves: `ae-roundtrip` (autoencoder only), `fixed-seed`/`fresh-seed`, `inject=P` (real "
        "data with probability P), `latent` (carry latents); comma-separated, `none` for none.")]
    = "ae-roundtrip,fixed-seed",
    inject_p: Annotated[float, typer.Option(help="Real-data injection probability of the main condition.")] = 0.0,
    carry: Annotated[str, typer.Option(help="`image` (uint8 thumbnails, as the release) or `latent`.")] = "image",
    cells: Annotated[int | None, typer.Option(help="Loop cells (default: half of the complete cells).")] = None,
    reference_cells: Annotated[int | None, typer.Option(
        help="Held-out real reference cells (default: as many as loop cells).")] = None,
    feature_extractor: Annotated[str, typer.Option(
        help="`auto` (Inception-v3 when installed, else the random-conv fallback), `inception-pool3`, "
        "`random-conv`.")] = "auto",
    cluster: Cluster = "local",
    workers: Workers = None,
    patches: Patches = "center",
    steps: Steps = DEFAULT_STEPS,
    solver: Solver = DEFAULT_SOLVER,
    dtype: Dtype = "float32",
    device: Device = "auto",
    batch_size: BatchSize = 16,
    block_samples: BlockSamples = 32,
    seed: Seed = 0,
    run_id: Annotated[str | None, typer.Option(help="Name of this run (default: loop-<time>-<hex>).")] = None,
    report: Annotated[bool, typer.Option(help="Write the HTML report to <out>/report.")] = True,
    storage_option: StorageOpt = None,
    allow_partial: AllowPartial = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Verbose = False,
) -> None:
    """Self-loop study: regenerate from the model's own outputs K times on complete cells, with controls,
    and measure degradation per iteration (paired vs the real cell and vs the previous step; distribution
    vs a held-out real set). Writes one cube per condition, `<out>/tables/metrics` and `<out>/report`.

    \b
    Example: copgen loop --source ./world --out ./study --spec 'S2L2A>S1RTC' -k 6
    \f
    Long by its signature: each parameter is one command-line option (typer reads them from here); the
    body checks them and maps them to the job in one call.
    """
    _verbose(verbose)
    so = _storage_options(storage_option)
    _preflight(source, out, weights, vae, so, dtype=dtype, solver=solver, steps=steps, batch_size=batch_size,
               patches=patches, cluster=cluster, workers=workers, block_samples=block_samples, run_id=run_id,
               loop_options=dict(spec=spec, iterations=iterations, seed_policy=seed_policy, controls=controls,
                                 inject_p=inject_p, carry=carry, cells=cells, reference_cells=reference_cells))
    from copgen.flows.jobs import LoopJob
    from copgen.flows.loop_study import run_loop_study

    try:
        job = LoopJob.from_options(
            source=source, out=out, weights=weights, vae=vae, spec=spec, iterations=iterations,
            seed_policy=seed_policy, controls=controls, inject_p=inject_p, carry=carry, patches=patches,
            cells=cells, reference_cells=reference_cells, steps=steps, solver=solver, dtype=dtype,
            device=device, batch_size=batch_size, block_samples=block_samples, run_seed=seed, run_id=run_id,
            feature_extractor=feature_extractor, report=report, storage_options=so)
        summary = _run_flow("loop_study", cluster, workers, run_loop_study, job=job)
    except _user_errors() as exc:
        _fail(exc)
    if summary.get("report"):
        console.print(f"Report: [bold]{summary['report']}[/]")
    _finish(summary, allow_partial, as_json)


@app.command()
def report(
    out: Annotated[str, typer.Argument(help="The `--out` of a loop run, a folder or a URL. Example: `copgen report s3://bucket/study`")],
    run_id: Annotated[str | None, typer.Option(help="Report this run only (default: every run of the study, the latest rows of each condition).")] = None,
    storage_option: StorageOpt = None,
) -> None:
    """(Re)write the self-contained HTML report (and PNGs) of a loop study into `<out>/report`."""
    from copgen.flows.jobs import OutputLayout
    from copgen.flows.report import ReportError, build_report, study_cubes
    from copgen.storage.fsutil import join_url

    so = _storage_options(storage_option)
    layout = OutputLayout(out, so)
    cubes = study_cubes(out, so)
    if not cubes:
        _fail(FileNotFoundError(f"no loop cubes (loop-*.zarr) under {out}"))
    try:
        path = build_report(join_url(out, "report"), metrics_url=layout.metrics, cubes=cubes, run_id=run_id,
                            storage_options=so)
    except ReportError as exc:
        _fail(exc)
    console.print(f"Report: [bold]{path}[/]")


@app.command()
def inspect(
    cube: Annotated[str, typer.Argument(help="A cube URL. Example: `copgen inspect ./completed/complete.zarr`")],
    storage_option: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a cube: samples, done, origins per iteration and modality, runs, quarantined samples."""
    from copgen.flows.cube_inspect import summarise

    try:
        info = summarise(cube, _storage_options(storage_option))
    except Exception as exc:  # noqa: BLE001 - any failure to read the cube is reported, not traced
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(info, indent=1, default=str))
        return
    console.print(f"[bold]{cube}[/]: {info['samples']} samples, {info['done']} done, "
                  f"{info['iterations']} iteration(s), {info['cells']} cells, tile {info['tile_size']} px")
    table = Table("iteration", "modality", "real", "generated", "absent")
    for row in info["origins"]:
        table.add_row(str(row["iteration"]), row["modality"], str(row["real"]), str(row["generated"]),
                      str(row["absent"]))
    console.print(table)
    if info["runs"]:
        runs = Table("run", "sampler", "steps", "seed", "samples written", title="runs (--json: all fields)")
        for run_id, prov in info["runs"].items():
            made = info["samples_by_run"].get(run_id, 0)
            runs.add_row(run_id, str(prov.get("sampler")), str(prov.get("steps")), str(prov.get("run_seed")),
                         str(made) if made else "none (already done)")
        console.print(runs)
    if info["quarantined"]:
        q = Table("grid_cell", "patch", "modality", "dataset / field", "file", "reason", title="quarantined")
        for rec in info["quarantined"]:
            where = "/".join(v for v in (rec.get("dataset"), rec.get("field")) if v)
            q.add_row(rec["grid_cell"], rec["patch"], rec["modality"], where, rec["file"][-60:],
                      rec["reason"][:120])
        console.print(q)


@app.command()
def export(
    cube: Annotated[str, typer.Argument(help="A cube URL. Example: `copgen export ./completed/complete.zarr --out ./corpus`")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder/URL for the corpus (must not hold one already).")],
    format: Annotated[str, typer.Option(
        "--format", help="`majortom` (published Core layout + origin/provenance columns) or `cog` (GeoTIFFs + STAC).")] = "majortom",
    origin: Annotated[str, typer.Option(help="`real`, `generated` or `real,generated`.")] = "real,generated",
    modality: Annotated[str | None, typer.Option(help="Modalities to export (default all). Example: `--modality S1RTC,DEM`")] = None,
    iteration: Annotated[int | None, typer.Option(help="Cube iteration (default the last: the completed state).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Only samples generated by this run.")] = None,
    with_source: Annotated[str | None, typer.Option(
        help="Also export the source's complete cells the completion left untouched (the full dataset). "
             "Example: `--with-source ./world`")] = None,
    tables: Annotated[str | None, typer.Option(
        help="Provenance table (default: `<cube>/../tables/provenance`).")] = None,
    lossless: Annotated[bool, typer.Option(help="majortom: PNG thumbnails for every modality (published S2 is JPEG).")] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Export a cube as a training corpus: Major TOM layout (read back by `copgen train`) or COG + STAC.

    Quarantined and unfinished samples are never exported. Example:
    `copgen export ./completed/complete.zarr --out ./corpus-cog --format cog --with-source ./world`
    """
    from copgen.flows.export import run_export
    from copgen.storage.export import ExportError

    so = _storage_options(storage_option)
    from copgen.flows.jobs import SourceSpec

    sizes = SourceSpec.at(with_source, so).thumbnail_sizes if with_source else None
    try:
        summary = run_export(cube, out, format=format, origins=[o.strip() for o in origin.split(",") if o.strip()],
                             modalities=modality, iteration=iteration, run_id=run_id,
                             tables_url=tables or "default", with_source=with_source,
                             source_thumbnail_sizes=sizes, thumbnail_format="png" if lossless else None,
                             storage_options=so)
    except (ExportError, *_user_errors()) as exc:
        _fail(exc)
    typer.echo(json.dumps(summary, indent=1, default=str))


@app.command()
def generate(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the generated images and provenance.json.")],
    dem: Annotated[str | None, typer.Option(help="DEM input (PNG/JPEG/WebP thumbnail or GeoTIFF). Example: `--dem a.tif`")] = None,
    s1rtc: Annotated[str | None, typer.Option(help="Sentinel-1 RTC input (thumbnail, or GeoTIFF: RGB or vv,vh).")] = None,
    s2l1c: Annotated[str | None, typer.Option(help="Sentinel-2 L1C input (thumbnail, or GeoTIFF: RGB or the 13 bands).")] = None,
    s2l2a: Annotated[str | None, typer.Option(help="Sentinel-2 L2A input (thumbnail, or GeoTIFF: RGB or the 12 bands).")] = None,
    target: Annotated[str | None, typer.Option(help="Modalities to generate (default: all not given). Example: `--target S1RTC`")] = None,
    weights: Weights = "bundled",
    vae: Vae = "bundled",
    steps: Steps = 50,
    solver: Solver = "release",
    dtype: Dtype = "float32",
    device: Device = "auto",
    batch_size: BatchSize = 16,
    seed: Seed = 0,
    grid_cell: Annotated[str, typer.Option(
        help="Name the tiles' seeds derive from; a Major TOM cell id reproduces `copgen complete`'s seed for that cell.")] = "image",
    storage_option: StorageOpt = None,
) -> None:
    """Generate missing modalities for single images, as the release's inference notebook: model-size tiles
    (256 px for the release; larger images are cut into tiles and stitched, smaller ones reflect-padded),
    GeoTIFF outputs in the inputs' CRS when an input had one, PNG otherwise, and provenance.json.

    Example: `copgen generate --dem dem.tif --s2l2a s2l2a.webp --target S1RTC --out ./gen`
    """
    so = _storage_options(storage_option)
    given = {m: p for m, p in (("DEM", dem), ("S1RTC", s1rtc), ("S2L1C", s2l1c), ("S2L2A", s2l2a)) if p}
    _preflight_generate(given, weights, vae, so, dtype=dtype, solver=solver, steps=steps, batch_size=batch_size)
    from copgen.flows.generate_files import run_generate

    try:
        from copgen.flows.jobs import resolve_model

        model = resolve_model(weights, vae, device=device, dtype=dtype, steps=steps, solver=solver,
                              batch_size=batch_size, storage_options=so)
        prov = run_generate(given, out, model, targets=target, seed=seed, grid_cell=grid_cell,
                            storage_options=so)
    except _user_errors() as exc:
        _fail(exc)
    typer.echo(json.dumps({k: prov[k] for k in ("outputs", "crs", "size", "sample_size")}, indent=1))


@app.command()
def world(
    out: Annotated[str, typer.Argument(help="Where to write the source. Example: `copgen world ./world`")],
    seed: Annotated[int, typer.Option(help="World seed: same seed, same bytes.")] = 0,
    rows: Annotated[int, typer.Option(help="Grid rows of cells.")] = 8,
    cols: Annotated[int, typer.Option(help="Grid columns of cells.")] = 8,
    lat: Annotated[float, typer.Option(help="Latitude of the south-west cell.")] = 46.0,
    lon: Annotated[float, typer.Option(help="Longitude of the south-west cell.")] = 8.0,
    thumbnail_size: Annotated[int, typer.Option(
        help="S1/S2 thumbnail side (1068 as published; 384 for the 64 px bundled model).")] = 384,
    missing: Annotated[str, typer.Option(
        help="Rates of missing modalities. Example: `--missing S1RTC=0.25,DEM=0.15`")] = "S1RTC=0.25,DEM=0.15",
    cloud_prob: Annotated[float, typer.Option(help="Probability that an S2 acquisition has clouds.")] = 0.2,
    with_bands: Annotated[bool, typer.Option(help="Also write raw bands (GeoTIFF) as published.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing world at OUT.")] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Write a synthetic Copernicus world (terrain-driven DEM, S2L2A, S2L1C, S1RTC) in the published Major TOM
    layout, with some modalities missing: an offline input for the demo, tests and training."""
    from copgen.flows.demo import write_demo_world

    rates = {}
    for item in filter(None, missing.split(",")):
        name, _, value = item.partition("=")
        rates[name.strip()] = float(value)
    try:
        summary = write_demo_world(out, seed=seed, rows=rows, cols=cols, origin=(lat, lon),
                                   thumbnail_size=thumbnail_size, missing=rates, cloud_prob=cloud_prob,
                                   with_bands=with_bands, overwrite=overwrite,
                                   storage_options=_storage_options(storage_option))
    except (ValueError, OSError) as exc:
        _fail(exc)
    console.print(f"World: {len(summary['cells'])} cells at {out} "
                  f"({', '.join(f'{m} {n}' for m, n in summary['cells_per_modality'].items())})")


@app.command()
def train(
    source: Source,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the checkpoints and training.json.")],
    autoencoder: Annotated[str | None, typer.Option(
        help="Existing autoencoder checkpoint to keep (skip its training). Example: `--autoencoder ae.safetensors`")]
    = None,
    sample_size: Annotated[int, typer.Option(help="Sample side in px (64 for the small model).")] = 64,
    network_steps: Annotated[int, typer.Option(help="Network optimiser steps.")] = 3000,
    autoencoder_steps: Annotated[int, typer.Option(help="Autoencoder optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Network batch size.")] = 32,
    autoencoder_crop: Annotated[int | None, typer.Option(
        help="Train the autoencoder on random crops of this size (cheaper; finish with full-size steps "
             "via --autoencoder-init, see training.json's reconstruction_psnr).")] = None,
    autoencoder_init: Annotated[str | None, typer.Option(
        help="Start the autoencoder from these weights (fine-tune). Example: `--autoencoder-init ae.safetensors`")]
    = None,
    network_init: Annotated[str | None, typer.Option(
        help="Start the network from these weights (fine-tune), e.g. an earlier `copgen train` run; they must "
             "fit the small default config (release-size fine-tuning: a TrainJob's network config).")]
    = None,
    time_limit: Annotated[float | None, typer.Option(
        help="Stop after this many seconds (whole run) and save a checkpoint that --resume continues; "
             "training.json says stopped_at_time_limit. Example: `--time-limit 3600`")] = None,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (GPUs with bf16 units; weights stay fp32).")] = False,
    generated_fraction: Annotated[float | None, typer.Option(
        help="With a cube or `copgen export` corpus as --source: share of training samples that hold generated "
             "tiles (0 = real only; default: every sample as stored). Example: `--generated-fraction 0.3`")] = None,
    clean_prob: Annotated[float, typer.Option(
        help="Probability that a modality is given clean (as a condition) in a network training sample; "
             "0 = the release objective. The bundled model used 0.5: see its MODEL_CARD.md.")] = 0.0,
    seed: Seed = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the state saved in --out.")] = False,
    device: Device = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    storage_option: StorageOpt = None,
) -> None:
    """Train (or fine-tune) a Triffuser and a KL autoencoder with the release's objective (independent
    timestep per modality, summed loss, AdamW, EMA) on a Major TOM-format source, a copgen cube or a
    `copgen export --format majortom` corpus (real and generated samples, mixed by --generated-fraction).

    \b
    Example: copgen train --source ./trainworld --out ./model --network-steps 2500
    """
    _preflight_train(source, {"--autoencoder": autoencoder, "--autoencoder-init": autoencoder_init,
                              "--network-init": network_init}, _storage_options(storage_option) or {})
    import torch
    from copgen.flows.train import TrainingError, TrainJob, run_training

    if threads:
        torch.set_num_threads(threads)
    try:  # the options map to the job here, and only here (<stage>_<setting>: see TrainJob.from_options)
        job = TrainJob.from_options(
            source_url=source, out_dir=out, autoencoder_url=autoencoder, sample_size=sample_size,
            network_steps=network_steps, autoencoder_steps=autoencoder_steps, network_batch_size=batch_size,
            autoencoder_crop=autoencoder_crop, autoencoder_init=autoencoder_init, network_init=network_init,
            network_clean_prob=clean_prob, time_limit_s=time_limit, seed=seed, resume=resume, device=device,
            bf16=bf16, generated_fraction=generated_fraction,
            storage_options=_storage_options(storage_option) or None)
        result = run_training(job)
    except (TrainingError, *_user_errors()) as exc:  # e.g. an --autoencoder-init that cannot be loaded
        _fail(exc)
    console.print(_summary_table(_train_summary(result, out), title="training"))


def _train_summary(result: dict[str, Any], out: str) -> dict[str, Any]:
    """The few figures a person checks after training; everything else is in training.json."""
    rows: dict[str, Any] = {}
    for stage in ("autoencoder", "network"):
        entry = result.get(stage)
        if not entry:
            rows[stage] = "kept (not trained)" if stage == "autoencoder" else "—"
            continue
        steps = f"{entry.get('steps')}/{entry.get('steps_requested')} steps"
        if entry.get("stopped_at_time_limit"):
            steps += " (stopped at --time-limit: --resume continues)"
        loss = entry.get("final_loss")
        line = [steps, f"final loss {loss:.4g}" if isinstance(loss, float) else "",
                f"{entry.get('wall_time_s', 0):.0f} s", f"weights {entry.get('weights')}"]
        psnr = entry.get("reconstruction_psnr")
        if isinstance(psnr, dict) and psnr:
            line.append("reconstruction " + ", ".join(f"{k} {v:.1f} dB" for k, v in psnr.items()))
        rows[stage] = "; ".join(x for x in line if x)
    rows["details"] = f"{out.rstrip('/')}/training.json"
    return rows


@app.command()
def deploy(
    source: Source,
    out: Out,
    weights: Annotated[str, typer.Option(
        help="Network checkpoint (required: a path, `s3://…` or `hf://…` every worker can read; `bundled` "
        "is the small demo model, refused unless named). Example: "
        "`--weights hf://mespinosami/COP-GEN-Beta/nnet_ema_114000.pth`")],
    vae: Annotated[str, typer.Option(help="Autoencoder checkpoint (required), as `--weights`. Example: "
                                     "`--vae hf://mespinosami/COP-GEN-Beta/autoencoder_kl.pth`")],
    cron: Annotated[str, typer.Option(help="Schedule. Example: `--cron \"0 3 * * *\"` (03:00 every day)")]
    = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="Timezone of the schedule.")] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly-complete",
    pool: Annotated[str, typer.Option(
        help="Process work pool the deployment is registered for (created if missing); run its worker "
        "with `prefect worker start --pool <pool>`.")] = "copgen-pool",
    cluster: Cluster = "local",
    workers: Workers = None,
    steps: Steps = DEFAULT_STEPS,
    solver: Solver = DEFAULT_SOLVER,
    dtype: Dtype = "float32",
    batch_size: BatchSize = 16,
    block_samples: BlockSamples = 32,
    storage_option: StorageOpt = None,
    serve: Annotated[bool, typer.Option(
        help="Serve the deployment in this process instead of registering it for a work pool "
        "(long-running).")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="Only print the deployment and its next runs (no server needed).")] = False,
) -> None:
    """Register the scheduled `complete` deployment (incremental through the ledger) on the Prefect server
    at `PREFECT_API_URL`, for a process work pool, or `--serve` it in this process. Both need a real
    server (`prefect server start`): schedules never fire on Prefect's temporary one.

    \b
    Example: copgen deploy --source s3://b/majortom --out s3://b/completed --weights s3://b/models/nnet.pth --vae s3://b/models/ae.pth --cluster tcp://scheduler:8786
    """
    from copgen.flows.deploy import DeployError, build_deployment, next_runs

    params: dict[str, Any] = {"source": source, "out": out, "weights": weights, "vae": vae, "cluster": cluster,
                              "steps": steps, "solver": solver, "dtype": dtype, "batch_size": batch_size,
                              "block_samples": block_samples}
    try:
        deployment = build_deployment(name, cron, _deploy_params(params, workers, storage_option),
                                      timezone=timezone)
    except DeployError as exc:
        _fail(exc)
    console.print(f"deployment [bold]{deployment.name}[/] of flow `complete`, entrypoint {deployment.entrypoint}")
    console.print(f"schedule: {cron} ({timezone}); next runs:")
    for when in next_runs(cron, 3, timezone=timezone):
        console.print(f"  {when.isoformat()}")
    if not dry_run:
        _register_or_serve(deployment, pool, serve)


def _deploy_params(params: dict[str, Any], workers: int | None, storage_option) -> dict[str, Any]:
    """The deployment's flow parameters: ``params`` plus workers and storage options when given; ``bundled``
    weights resolved to the packaged files (with a warning: not a completion of real data)."""
    so = _storage_options(storage_option)
    if workers is not None:
        params["workers"] = workers
    if so:
        params["storage_options"] = so
    if params["weights"] == "bundled" or params["vae"] == "bundled":
        console.print("[yellow]warning:[/] `bundled` is the small demo model trained on the synthetic world, "
                      "not COP-GEN-Beta: its samples are no dataset completion of real Copernicus data")
        from copgen.flows.jobs import resolve_model

        spec = resolve_model(params["weights"], params["vae"])
        params.update(weights=spec.weights, vae=spec.vae)
    return params


def _register_or_serve(deployment, pool: str, serve: bool) -> None:
    """Register ``deployment`` for the work pool ``pool``, or serve it in this process (``serve``)."""
    from copgen.flows.deploy import DeployError, register, require_server

    try:
        if serve:
            url = require_server()
        else:
            deployment_id = register(deployment, pool)
    except DeployError as exc:
        _fail(exc)
    if not serve:
        console.print(f"registered {deployment_id} for work pool {pool}; "
                      f"run its worker: prefect worker start --pool {pool} --type process")
        return
    console.print(f"serving on {url} (Ctrl-C stops)")
    from prefect import serve as prefect_serve

    prefect_serve(deployment, print_starting_message=False)


@app.command()
def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write everything.")] = "copgen-demo",
    workers: Workers = 2,
    iterations: Annotated[int, typer.Option("--iterations", "-k", help="Loop iterations K.")] = 5,
    steps: Steps = 20,
) -> None:
    """The whole mission on this machine in a few minutes: a synthetic world with missing modalities →
    `complete` → a `loop` study with controls → metrics and report, with the bundled model.

    \b
    Example: copgen demo --out ./copgen-demo
    """
    from copgen.flows.demo import run_demo

    t0 = time.perf_counter()
    try:
        result = run_demo(out, workers=workers, iterations=iterations, steps=steps, console=console,
                          progress_factory=_Progress)
    except _user_errors() as exc:
        _fail(exc)
    console.print(f"\n[bold green]Demo finished in {time.perf_counter() - t0:.0f} s.[/]")
    for label, where in result["outputs"].items():
        console.print(f"  {label}: {where}")
    console.print(f"\nOpen the report: [bold]{result['report']}[/]")


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(copgen.__version__)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so every ``with`` (Prefect server, cluster, lease) unwinds."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()



def main() -> None:  # pragma: no cover - the console script (tests run it as a subprocess)
    """The console script: the exit-code policy of ``copgen.flows.failures`` around the typer app."""
    import signal

    import click
    from copgen.flows.failures import (
        EXIT_INTERRUPTED,
        EXIT_TERMINATED,
        HINTS,
        classify,
        record_signals,
        signal_exit_code,
    )

    signal.signal(signal.SIGTERM, _on_sigterm)
    record_signals()  # a signal's exception may arrive wrapped in another one (failures.signal_exit_code)
    try:
        rv = app(standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the policy decides: one line, or the traceback
        by_signal = signal_exit_code(exc)
        if by_signal == EXIT_TERMINATED:
            console.print("terminated (SIGTERM): the run's server and cluster were shut down; rerun to resume")
            sys.exit(EXIT_TERMINATED)
        if by_signal == EXIT_INTERRUPTED:
            console.print("interrupted: the run's server and cluster were shut down; rerun to resume")
            sys.exit(EXIT_INTERRUPTED)
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        err = classify(exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        if _VERBOSE:
            console.print_exception(show_locals=False)
        code = int(getattr(err, "exit_code", 2))
        console.print(f"[red]error:[/] {_escape(err)}")
        hint = getattr(err, "hint", None) or HINTS.get(code)
        if hint:
            console.print(f"hint: {_escape(hint)}", highlight=False)
        sys.exit(code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["app", "Path"]
