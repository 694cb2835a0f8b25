"""What a run is: the small, picklable descriptions that the driver plans and the workers execute.

Everything here travels with every task, so it holds URLs, options and ids, never data or models.
One job object per flow (:class:`CompleteJob`, :class:`LoopJob`, :class:`TrainJob`): frozen, validated
once when built, built by the CLI and by the deployable flows from the same flat options
(``from_options``, the one place options map to a job), and turned back into those JSON-able options for
Prefect parameters and deployments (``to_options``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from copgen.errors import CopgenError, TrainingError
from copgen.flows.models import ModelSpec
from copgen.loop_config import LoopConfig, LoopError, loop_configs
from copgen.loop_config import parse_controls as _parse_controls
from copgen.modalities import Modality, parse_list
from copgen.storage.fsutil import check_id, join_url, redact_url
from copgen.storage.majortom.reader import MajorTomReader, MetadataFilter
from copgen.storage.majortom.world import read_world

PATCH_MODES = ("center", "grid")


class JobError(CopgenError, ValueError):
    """An option combination that cannot run; the message names the option."""


def new_run_id(prefix: str) -> str:
    """``<prefix>-YYYYmmddTHHMMSS-<6 hex>``: sortable, unique, safe as a path component."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str) -> str:
    try:
        return check_id(run_id, "--run-id")
    except ValueError as exc:
        raise JobError(str(exc)) from None


@dataclass(frozen=True)
class SourceSpec:
    """A Major TOM Core source: a root holding ``Core-*`` datasets and/or per-modality URLs."""

    root: str | None = None
    urls: dict[str, str] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Expected thumbnail side per modality name; empty = the published sizes (1068, DEM 356), -1 = any.
    thumbnail_sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def at(cls, root: str, storage_options: dict[str, Any] | None = None) -> SourceSpec:
        """The source at ``root``; a synthetic world's descriptor declares its (smaller) thumbnail sizes."""
        so = dict(storage_options or {})
        world = read_world(root, so)
        return cls(root=root, storage_options=so, thumbnail_sizes=world.thumbnail_sizes if world else {})

    def open(self, on_error: str = "skip") -> MajorTomReader:
        from copgen.storage.majortom.tiles_folder import TileFolderReader, is_tiles_folder

        if not self.urls and is_tiles_folder(self.root, self.storage_options):
            return TileFolderReader(self.root, storage_options=self.storage_options, on_error=on_error)
        sizes = {m: (None if v < 0 else v) for m, v in self.thumbnail_sizes.items()}
        return MajorTomReader(self.root, urls=self.urls or None, storage_options=self.storage_options,
                              on_error=on_error, thumbnail_sizes=sizes or None)


@dataclass(frozen=True)
class OutputLayout:
    """Where a run writes: ``<out>/<name>.zarr`` cubes, ``<out>/tables/{metrics,provenance}``."""

    out: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def cube(self, name: str) -> str:
        return join_url(self.out, f"{name}.zarr")

    @property
    def metrics(self) -> str:
        return join_url(self.out, "tables", "metrics")

    @property
    def provenance(self) -> str:
        return join_url(self.out, "tables", "provenance")


@dataclass(frozen=True)
class RunInfo:
    """Run-level provenance shared by every block (DESIGN §7)."""

    run_id: str
    run_seed: int
    model: ModelSpec
    network_sha256: str
    autoencoder_sha256: str
    package_version: str
    synthetic: bool
    sample_size: int
    latent_shape: tuple[int, int, int]
    patch_mode: str  # center | grid
    invalid_rows: str = "quarantine"  # what rejected metadata rows mean: quarantine | missing

    def provenance(self) -> dict[str, Any]:
        return {
            "invalid_rows": self.invalid_rows,
            "run_id": self.run_id,
            "run_seed": self.run_seed,
            "network": redact_url(self.model.weights),
            "autoencoder": redact_url(self.model.vae),
            "network_sha256": self.network_sha256,
            "autoencoder_sha256": self.autoencoder_sha256,
            "sampler": self.model.solver,
            "steps": self.model.steps,
            "dtype": self.model.dtype,
            "batch_size": self.model.batch_size,
            "package_version": self.package_version,
            "synthetic_inputs": self.synthetic,
            "sample_size": self.sample_size,
            "patches": self.patch_mode,
        }


def patches_for(mode: str) -> list[str]:
    """The patch labels of a patch mode: the centre crop, or the 16 patches of the 4x4 grid."""
    if mode == "center":
        return ["center"]
    if mode == "grid":
        return [str(p) for p in range(16)]
    raise JobError(f"--patches {mode!r}: choose 'center' or 'grid'")


def patch_arg(label: str) -> str | int:
    return label if label == "center" else int(label)


def resolve_model(weights: str, vae: str, **options: Any) -> ModelSpec:
    """A :class:`ModelSpec`; ``bundled`` for either checkpoint means the small model shipped in the
    package (its sha256 is known, so workers verify rather than hash it again)."""
    if weights == "bundled" or vae == "bundled":
        from copgen import bundled

        net_path, vae_path = bundled.paths()
        sums = bundled.checksums()
        if weights == "bundled":
            weights, options["weights_sha256"] = net_path, sums.get("network.safetensors")
        if vae == "bundled":
            vae, options["vae_sha256"] = vae_path, sums.get("autoencoder.safetensors")
    return ModelSpec(weights=weights, vae=vae, **options)


def _filters(bbox, start, end, max_cloud_cover) -> MetadataFilter:
    box = tuple(float(v) for v in bbox.split(",")) if isinstance(bbox, str) else bbox
    if box is not None and len(box) != 4:
        raise JobError(f"--bbox {bbox!r}: expected 4 numbers min_lon,min_lat,max_lon,max_lat")
    try:
        return MetadataFilter(bbox=tuple(box) if box else None, start=start, end=end,
                              max_cloud_cover=max_cloud_cover)
    except ValueError as exc:
        raise JobError(f"--bbox: {exc}") from None


# The options every job shares (the model's and the I/O's; names as on the command line).
_COMMON = ("source", "out", "weights", "vae", "steps", "solver", "dtype", "device", "batch_size",
           "block_samples", "run_seed", "run_id", "storage_options")


@dataclass(frozen=True)
class _Job:
    source: SourceSpec
    out: OutputLayout
    model: ModelSpec
    patches: str = "center"
    run_seed: int = 0
    run_id: str | None = None
    block_samples: int = 32

    def __post_init__(self) -> None:
        patches_for(self.patches)
        if self.run_id is not None:
            check_run_id(self.run_id)
        if not isinstance(self.block_samples, int) or self.block_samples < 1:
            raise JobError(f"--block-samples {self.block_samples!r}: must be an integer >= 1")

    def _common_options(self) -> dict[str, Any]:
        m = self.model
        return {"source": self.source.root, "out": self.out.out, "weights": m.weights, "vae": m.vae,
                "steps": m.steps, "solver": m.solver, "dtype": m.dtype, "device": m.device,
                "batch_size": m.batch_size, "block_samples": self.block_samples, "run_seed": self.run_seed,
                "patches": self.patches, "storage_options": dict(self.out.storage_options),
                "thumbnail_sizes": dict(self.source.thumbnail_sizes)}

    @staticmethod
    def _common_from(opts: dict[str, Any]) -> dict[str, Any]:
        so = dict(opts.pop("storage_options", None) or {})
        model = resolve_model(opts.pop("weights"), opts.pop("vae"), storage_options=so,
                              **{k: opts.pop(k) for k in ("steps", "solver", "dtype", "device", "batch_size")
                                 if k in opts})
        source = SourceSpec.at(opts.pop("source"), so)
        sizes = opts.pop("thumbnail_sizes", None)
        if sizes:  # explicit sizes win over a world descriptor's
            source = replace(source, thumbnail_sizes=dict(sizes))
        return {"source": source, "out": OutputLayout(opts.pop("out"), so), "model": model}


@dataclass(frozen=True)
class CompleteJob(_Job):
    """One dataset completion run (``copgen complete`` / the ``complete`` flow)."""

    generate: tuple[str, ...] = ()  # modality names to generate; empty: every missing one
    regenerate_present: bool = False
    samples_per_cell: int = 1
    filters: MetadataFilter = field(default_factory=MetadataFilter)
    save_latents: bool = False
    lease_ttl_s: float = 300.0
    invalid_rows: str = "quarantine"  # quarantine (a cell with a rejected row waits) | missing
    retry_quarantined: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        from copgen.flows.invalid_rows import check_policy  # it imports JobError from here

        check_policy(self.invalid_rows)
        gen = self.generate
        if isinstance(gen, str):
            gen = () if gen in ("", "missing") else gen.split(",")
        names = parse_list(gen or ())
        object.__setattr__(self, "generate", tuple(m.name for m in names))
        if not isinstance(self.samples_per_cell, int) or self.samples_per_cell < 1:
            raise JobError(f"--samples-per-cell {self.samples_per_cell!r}: must be an integer >= 1")

    @property
    def targets(self) -> tuple[Modality, ...] | None:
        """The modalities to generate, ``None`` for every missing one."""
        return tuple(Modality.parse(m) for m in self.generate) or None

    @classmethod
    def from_options(cls, *, bbox=None, start=None, end=None, max_cloud_cover=None,
                     generate: str = "missing", **options: Any) -> CompleteJob:
        """The job from flat options (the CLI's, the flow's parameters); unknown names are an error."""
        common = cls._common_from(options)
        return cls(**common, **options, generate=generate,
                   filters=_filters(bbox, start, end, max_cloud_cover))

    def to_options(self) -> dict[str, Any]:
        """JSON-able flat options: the ``complete`` flow's parameters (a deployment carries them; the
        run id and lease are per run, not part of them). ``from_options(**to_options())`` rebuilds the job."""
        f = self.filters
        return {**self._common_options(), "generate": ",".join(self.generate) or "missing",
                "regenerate_present": self.regenerate_present, "samples_per_cell": self.samples_per_cell,
                "bbox": list(f.bbox) if f.bbox else None, "start": _iso(f.start), "end": _iso(f.end),
                "max_cloud_cover": f.max_cloud_cover, "save_latents": self.save_latents,
                "invalid_rows": self.invalid_rows, "retry_quarantined": self.retry_quarantined}


@dataclass(frozen=True)
class LoopJob(_Job):
    """One self-loop study (``copgen loop`` / the ``loop_study`` flow)."""

    spec: str = "S2L2A>S1RTC"
    iterations: int = 5
    seed_policy: str = "fresh"
    controls: tuple[str, ...] = ()
    inject_p: float = 0.0
    carry: str = "image"
    joint: bool = False
    cells: int | None = None
    reference_cells: int | None = None
    feature_extractor: str = "auto"
    report: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.controls
        items = c.split(",") if isinstance(c, str) else list(c or ())
        object.__setattr__(self, "controls", tuple(x.strip() for x in items if x.strip() and x != "none"))
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise JobError(f"--iterations {self.iterations!r}: must be an integer >= 1")
        for name in ("cells", "reference_cells"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise JobError(f"--{name.replace('_', '-')} {v!r}: must be an integer >= 0")
        self.configs()  # the loop options and controls are checked here, once

    def configs(self) -> list[LoopConfig]:
        """The main condition, one per control, then one per further spec: several specs
        (``S2L2A>S2L1C,S2L2A>S1RTC``) run the controls on the first, the others as main loops."""
        try:
            return loop_configs(self.spec, self.iterations, self.seed_policy, list(self.controls),
                                self.inject_p, self.carry, self.run_seed, self.joint)
        except LoopError as exc:
            raise JobError(str(exc)) from None

    @classmethod
    def from_options(cls, **options: Any) -> LoopJob:
        """The job from flat options (the CLI's, the flow's parameters); unknown names are an error."""
        common = cls._common_from(options)
        return cls(**common, **options)

    def to_options(self) -> dict[str, Any]:
        """JSON-able flat options: the ``loop_study`` flow's parameters (the run id and ``report``, always
        on in the flow, aside). ``from_options(**to_options())`` rebuilds the job."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in
               {*_COMMON, "model", "patches", "report"}}
        return {**self._common_options(), **own, "controls": ",".join(self.controls) or "none"}


def parse_controls(base: LoopConfig, controls: str | list[str] | None) -> list[LoopConfig]:
    """The main condition plus one per control (``copgen.loop_config.parse_controls``; errors as JobError)."""
    try:
        return _parse_controls(base, controls)
    except LoopError as exc:
        raise JobError(str(exc)) from None


# ---- training -------------------------------------------------------------------------------------------

SAVE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _Stage:
    """One model's training settings (the fields both models share; defaults in the subclasses).

    ``config``: model keywords over the flow's defaults; ``lr`` .. ``grad_clip``: the optimiser
    (``copgen.train.OptimConfig``); ``init``: weights to start from (fine-tuning); ``flip``: random
    horizontal flips; checkpoints every ``save_every`` steps in ``save_dtype``."""

    config: dict[str, Any] | None = None
    steps: int = 1
    batch_size: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_rate: float | None = None
    flip: bool = True
    init: str | None = None
    save_every: int = 500
    log_every: int = 50
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TrainingError(f"{name} must be a positive integer, got {value!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TrainingError(f"save_dtype {self.save_dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
        if self.ema_rate is not None and not 0.0 <= self.ema_rate < 1.0:
            raise TrainingError(f"ema_rate must be in [0, 1), got {self.ema_rate}")
        object.__setattr__(self, "betas", tuple(self.betas))  # a JSON list comes back as a tuple
        if self.config is not None:
            object.__setattr__(self, "config", dict(self.config))

    def optim_options(self) -> dict[str, Any]:
        """The ``copgen.train.OptimConfig`` keywords."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas,
                "warmup_steps": self.warmup_steps, "grad_clip": self.grad_clip}


@dataclass(frozen=True)
class AutoencoderStage(_Stage):
    """The autoencoder's settings; the optimiser defaults are LDM's autoencoder ones (Adam betas (0.5, 0.9),
    no weight decay). ``crop``: train on random crops of this side; the loss is L1 (+ L2) + KL."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 4e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_rate: float | None = None
    crop: int | None = None
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop is not None and (not isinstance(self.crop, int) or self.crop < 1):
            raise TrainingError(f"crop must be a positive integer (px), got {self.crop!r}")

    def losses(self) -> dict[str, float]:
        return {"l1_weight": self.l1_weight, "l2_weight": self.l2_weight, "kl_weight": self.kl_weight}


@dataclass(frozen=True)
class NetworkStage(_Stage):
    """The network's settings; the defaults are the release optimiser (AdamW 2e-4, wd 0.03, betas
    (0.99, 0.99), EMA 0.9999) with a short warm-up and EMA warm-up for short runs. ``clean_prob`` > 0
    departs from the release objective (``copgen.train.sample_timesteps``)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.99, 0.99)
    warmup_steps: int = 100
    grad_clip: float | None = None
    ema_rate: float | None = 0.9999
    ema_warmup: bool = True
    clean_prob: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.clean_prob < 1.0:
            raise TrainingError(f"clean_prob must be in [0, 1), got {self.clean_prob}")


_STAGES = {"autoencoder": AutoencoderStage, "network": NetworkStage}


@dataclass(frozen=True)
class TrainJob:
    """One training run (``copgen train`` / the ``train`` flow): the autoencoder stage (skipped when
    ``autoencoder_url`` is given), then the network stage, on the samples of one source.

    ``source_url``: a Major TOM-format source, a copgen cube or export (``generated_fraction`` sets their
    real/generated mix); ``patch``: ``all`` (16 patches per cell), ``center`` or one patch 0..15;
    ``time_limit_s``: from the start of the run (a stage run alone: of the stage)."""

    source_url: str
    out_dir: str
    autoencoder: AutoencoderStage = field(default_factory=AutoencoderStage)
    network: NetworkStage = field(default_factory=NetworkStage)
    autoencoder_url: str | None = None
    sample_size: int = 64
    patch: str | int = "all"
    max_cells: int | None = None
    generated_fraction: float | None = None
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    bf16: bool = False
    time_limit_s: float | None = None
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name, cls in _STAGES.items():
            stage = getattr(self, name)
            if isinstance(stage, Mapping):
                object.__setattr__(self, name, cls(**stage))
            elif not isinstance(stage, cls):
                raise TrainingError(f"{name}: expected {cls.__name__} settings, got {type(stage).__name__}")
        if not isinstance(self.sample_size, int) or self.sample_size < 1:
            raise TrainingError(f"sample_size must be a positive integer, got {self.sample_size!r}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise TrainingError(f"time_limit_s must be > 0 seconds, got {self.time_limit_s}")
        if self.generated_fraction is not None and not 0.0 <= self.generated_fraction <= 1.0:
            raise TrainingError(f"generated_fraction {self.generated_fraction}: must be in [0, 1]")
        if self.patch not in ("all", "center") and self.patch not in range(16):
            raise TrainingError(f"patch {self.patch!r}: choose 'all', 'center' or a patch 0..15")

    @property
    def autoencoder_weights(self) -> str:
        """The autoencoder the network trains on: ``autoencoder_url``, else the one this run trains."""
        return self.autoencoder_url or join_url(self.out_dir, "autoencoder.safetensors")

    @classmethod
    def from_options(cls, **options: Any) -> TrainJob:
        """The job from flat options (the CLI's, the flow's parameters): a stage's settings as a dict
        (``network={"steps": 10}``) or one by one as ``<stage>_<setting>`` (``network_steps=10``,
        ``autoencoder_init=...``); unknown names are an error."""
        stages = {n: _settings(options.pop(n, None)) for n in _STAGES}
        own = {f.name for f in fields(cls)}
        for key in [k for k in options if k not in own]:
            stage, _, name = key.partition("_")
            if stage not in stages or name not in {f.name for f in fields(_STAGES[stage])}:
                raise TypeError(f"TrainJob.from_options: unknown option {key!r}")
            stages[stage][name] = options.pop(key)
        return cls(**options, **stages)

    def to_options(self) -> dict[str, Any]:
        """JSON-able options: the ``train`` flow's parameters (stage settings as dicts);
        ``from_options(**to_options())`` rebuilds the job."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _STAGES}
        for name in _STAGES:
            stage = asdict(getattr(self, name))
            out[name] = {**stage, "betas": list(stage["betas"])}
        return out


def _settings(stage: Any) -> dict[str, Any]:
    return asdict(stage) if isinstance(stage, _Stage) else dict(stage or {})


def _iso(value) -> str | None:
    return value.isoformat() if hasattr(value, "isoformat") else value


__all__ = ["AutoencoderStage", "CompleteJob", "JobError", "LoopJob", "NetworkStage", "OutputLayout",
           "RunInfo", "SourceSpec", "TrainJob", "parse_controls", "resolve_model"]
