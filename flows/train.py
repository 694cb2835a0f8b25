"""Training flows: a small KL autoencoder and the COP-GEN-Beta network on a Major TOM-format source.

Used to make the small bundled model and by users to fine-tune on their own data (DESIGN §6 ``train``).
A run is one :class:`~copgen.flows.jobs.TrainJob` (its ``autoencoder`` and ``network`` stage settings), built
by ``copgen train`` or the ``train`` flow's parameters and taken by ``run_training``, ``train_autoencoder``
and ``train_network``.

Data: the complete cells of the source (all four modalities present), each cut by ``to_samples``
(``patch="all"``: 16 patches per cell, ``"center"``: one) at ``sample_size`` px, held in memory as uint8
(N, 4, S, S, 3) — a small dataset by design (64 px: 48 KiB per sample). A DEM thumbnail smaller than the
cell's other thumbnails is first resized to their side (PIL bilinear, the release's ``Resize(1068)`` of
356 px DEMs generalised to smaller worlds).

The network trains on posterior moments encoded once with the autoencoder (both orientations when
``flip=True``, so the random horizontal flip applies to all modalities of a sample alike) and a fresh
posterior sample every step, as the release (``copgen.train``).

Outputs in ``out_dir`` (any fsspec URL): ``autoencoder.safetensors`` + ``autoencoder.json`` (raw or EMA
weights, see ``train_autoencoder``), ``network.safetensors`` + ``network.json`` (EMA weights),
``<name>_train_state.pt`` (raw weights, EMA, optimiser, step, RNG, data order, loss history: what
``resume=True`` continues from; loaded with ``weights_only=True``) and ``training.json`` (one entry per
model: config, data, steps, wall time, final losses, loss curve summary); the last two are read and
written by ``copgen.storage.training_files``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from copgen import train as core
from copgen.autoencoder import AutoencoderKL
from copgen.errors import TrainingError
from copgen.flows.jobs import AutoencoderStage, NetworkStage, TrainJob
from copgen.flows.models import load_autoencoder
from copgen.metrics.paired import psnr
from copgen.modalities import Modality
from copgen.model import Triffuser, count_parameters
from copgen.storage import fsutil
from copgen.storage import training_files as files
from copgen.storage.checkpoint_files import save_checkpoint, sha256_of
from copgen.storage.majortom import thumbnails
from copgen.storage.majortom.reader import BadSample, MajorTomReader, MetadataFilter
from PIL import Image
from prefect import flow
from torch import Tensor

Log = Callable[[str], None]

#: Small autoencoder (1.40 M parameters, 5.3 MiB fp32): downsample 8 (four levels: 64 px -> 8x8 latents),
#: 4 latent channels; GroupNorm(32) needs ch % 32 == 0. (The reference tiny autoencoder's layout.)
DEFAULT_AUTOENCODER_CONFIG: dict[str, Any] = {
    "ch": 32,
    "ch_mult": [1, 1, 2, 2],
    "num_res_blocks": 2,
    "z_channels": 4,
    "embed_dim": 4,
    "attn_resolutions": [],
    "dropout": 0.0,
}
#: Small network (4.33 M parameters, 16.5 MiB fp32 at 8x8 latents: 4 x 16 patch tokens + 4 time tokens);
#: ``img_size`` and ``in_chans`` come from the autoencoder and the sample size.
DEFAULT_NETWORK_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "embed_dim": 192,
    "depth": 8,
    "num_heads": 3,
    "mlp_ratio": 4,
    "qkv_bias": False,
    "num_modalities": 4,
}
AUTOENCODER_NAME = "autoencoder"
NETWORK_NAME = "network"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- data ---------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The training samples held in memory: ``images`` uint8 (N, 4, S, S, 3), modalities in model order."""

    images: np.ndarray
    cells: list[str]
    patches: list[int | str]
    source: str
    sample_size: int
    patch: str | int
    bad: list[BadSample] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return len(dict.fromkeys(self.cells))

    def fingerprint(self) -> str:
        """Identifies the sample list (cells, patches, size), to tell whether a resumed run sees the same."""
        h = hashlib.sha256(f"{self.sample_size}|{self.images.shape}".encode())
        for c, p in zip(self.cells, self.patches, strict=True):
            h.update(f"{c}:{p};".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "cells": self.n_cells,
            "samples": int(self.images.shape[0]),
            "patch": self.patch,
            "sample_size": self.sample_size,
            "bad_records": len(self.bad),
            "fingerprint": self.fingerprint(),
        }


def load_training_data(
    source_url: str,
    *,
    sample_size: int = 64,
    patch: str | int = "all",
    max_cells: int | None = None,
    filters: MetadataFilter | None = None,
    storage_options: Mapping[str, Any] | None = None,
    chunk_cells: int = 16,
    log: Log = print,
    generated_fraction: float | None = None,
) -> TrainingData:
    """Read the complete cells of a Major TOM-format source and cut them into uint8 samples.

    Bad records are skipped (and counted): a cell is used only when all four thumbnails decode.
    Thumbnails are fetched ``chunk_cells`` cells at a time, so only the small samples accumulate.

    A copgen cube or ``copgen export`` corpus is read through ``copgen.storage.dataset`` instead: each
    sample with all four modalities (real or generated, mixed as ``generated_fraction`` asks) is one
    training sample, resized to ``sample_size``.
    """
    shown = fsutil.redact_url(str(source_url))
    from copgen.storage.dataset import corpus_kind

    if corpus_kind(str(source_url), storage_options):
        return _corpus_data(str(source_url), shown, sample_size, max_cells, storage_options,
                            generated_fraction, log)
    if generated_fraction is not None:
        raise TrainingError(f"{shown}: generated_fraction needs a copgen cube or export as the source")
    # every modality, any square size (smaller worlds, fine-tuning sets); bad records skipped and counted
    reader = MajorTomReader(str(source_url), modalities=list(Modality), storage_options=storage_options,
                            on_error="skip", thumbnail_sizes={m: None for m in Modality})
    with reader:
        pairing = reader.pair(filters)
        complete = pairing.complete
        if max_cells is not None:
            complete = complete.iloc[: int(max_cells)]
        bad = list(pairing.bad)
        cells, per_cell = _cut_cells(reader, complete, patch, sample_size, chunk_cells, bad)
    if not per_cell:
        raise TrainingError(
            f"{shown}: no complete cell (all four modalities readable) to train on "
            f"({len(pairing.pairs)} cells paired, {len(bad)} bad records)"
        )
    images = np.concatenate(per_cell)  # (N, 4, S, S, 3)
    per = images.shape[0] // len(cells)
    patch_ids: list[int | str] = list(range(per)) if per > 1 else [patch]
    log(f"training data: {len(cells)} cells, {images.shape[0]} samples of {sample_size} px from {shown}")
    return TrainingData(
        images=images,
        cells=[c for c in cells for _ in range(per)],
        patches=patch_ids * len(cells),
        source=shown,
        sample_size=int(sample_size),
        patch=patch,
        bad=bad,
    )


def _corpus_data(
    url: str, shown: str, sample_size: int, max_cells: int | None, storage_options,
    generated_fraction: float | None, log: Log,
) -> TrainingData:
    """The samples of a copgen cube or export corpus (``copgen.storage.dataset``)."""
    from copgen.storage.dataset import training_arrays

    images, cells, keys = training_arrays(url, sample_size=sample_size, generated_fraction=generated_fraction,
                                          storage_options=storage_options)
    if max_cells is not None:
        images, cells, keys = images[: int(max_cells)], cells[: int(max_cells)], keys[: int(max_cells)]
    log(f"training data: {len(cells)} corpus samples of {sample_size} px from {shown}")
    return TrainingData(images=images, cells=cells, patches=keys, source=shown, sample_size=int(sample_size),
                        patch="corpus")


def _cut_cells(
    reader: MajorTomReader, complete, patch: str | int, sample_size: int, chunk_cells: int,
    bad: list[BadSample],
) -> tuple[list[str], list[np.ndarray]]:
    """The cells of ``complete`` whose four thumbnails decode, each cut into samples; fetched
    ``chunk_cells`` rows at a time; the fetches' bad records are appended to ``bad``."""
    per_cell: list[np.ndarray] = []
    cells: list[str] = []
    for start in range(0, len(complete), chunk_cells):
        rows = complete.iloc[start : start + chunk_cells]
        thumbs: dict[Modality, dict[str, np.ndarray]] = {}
        for m in Modality:
            fetched = reader.fetch_thumbnails(rows, m)
            bad.extend(fetched.bad)
            thumbs[m] = fetched.thumbnails
        for cell in rows["grid_cell"]:
            if not all(cell in thumbs[m] for m in Modality):
                continue
            cell_thumbs = {m: thumbs[m][cell] for m in Modality}
            per_cell.append(_cell_samples(cell, cell_thumbs, patch, sample_size))
            cells.append(cell)
    return cells, per_cell


def _cell_samples(
    cell: str, thumbs: Mapping[Modality, np.ndarray], patch: str | int, sample_size: int
) -> np.ndarray:
    """(P, 4, S, S, 3) samples of one cell; modalities brought to the cell's largest side first."""
    side = max(t.shape[0] for t in thumbs.values())
    out = []
    for m in Modality:
        t = thumbs[m]
        if t.shape[0] != side and not (m is Modality.DEM and t.shape[0] == thumbnails.DEM_PX):
            # to_samples itself upsamples a published 356 px DEM to 1068 (same PIL bilinear resize)
            t = np.asarray(Image.fromarray(t).resize((side, side), Image.Resampling.BILINEAR))
        context = {"cell": cell, "modality": m.name}
        out.append(thumbnails.to_samples(t, m, patch, sample_size, context=context))
    return np.stack(out, axis=1)


# ---- the training loop shared by both models ----------------------------------------------------------


@dataclass
class _Run:
    name: str
    job: TrainJob
    stage: AutoencoderStage | NetworkStage
    config: dict[str, Any]
    trainer: core.Trainer
    bank: core.LatentBank | core.ImageBank
    metadata: dict[str, Any]
    identity: dict[str, Any]  # what must match for a resume (config, autoencoder...)
    log: Log
    before_save: Callable[[dict[str, Tensor]], None] | None = None  # may update config from the weights
    history: dict[str, list] = field(default_factory=lambda: {"loss": [], "parts": []})
    wall_s: float = 0.0
    resumed_from: int | None = None
    deadline: float | None = None  # time.monotonic() after which the loop stops early
    stopped_early: bool = False

    # the settings the loop and the files read, by the names they had before the job object
    out_dir = property(lambda self: self.job.out_dir)
    storage_options = property(lambda self: self.job.storage_options)
    resume = property(lambda self: self.job.resume)
    steps = property(lambda self: self.stage.steps)
    batch_size = property(lambda self: self.stage.batch_size)
    save_every = property(lambda self: self.stage.save_every)
    log_every = property(lambda self: self.stage.log_every)
    save_dtype = property(lambda self: _DTYPES[self.stage.save_dtype])


def _resume(run: _Run, data_fingerprint: str) -> None:
    url = files.state_url(run.out_dir, run.name)
    state = files.load_state(url, run.storage_options)
    if state is None:
        run.log(f"{run.name}: nothing to resume at {fsutil.redact_url(url)}, starting from step 0")
        return
    for key, value in run.identity.items():
        saved = state["identity"].get(key)
        if key == "autoencoder_sha256" and saved is None:
            continue  # saved before local autoencoders were hashed
        if json.loads(json.dumps(value, default=str)) != saved:
            raise TrainingError(
                f"{fsutil.redact_url(url)}: saved {key} {state['identity'].get(key)!r} differs from this "
                f"run's {value!r}; resume with the same settings or use another out_dir"
            )
    run.trainer.load_state_dict(state["trainer"])
    if state.get("data_fingerprint") == data_fingerprint:
        run.bank.load_state_dict(state["data_order"])
    else:
        run.log(f"{run.name}: the data differ from the saved run's; restarting the data order")
    run.history = {"loss": list(state["history"]["loss"]), "parts": list(state["history"]["parts"])}
    run.wall_s = float(state.get("wall_s", 0.0))
    run.resumed_from = run.trainer.step
    run.log(f"{run.name}: resumed from step {run.trainer.step}")


def _checkpoint(run: _Run, data_fingerprint: str) -> str:
    published = run.trainer.weights()
    if run.before_save is not None:
        run.before_save(published)
    weights = {k: v.to(run.save_dtype) if v.is_floating_point() else v for k, v in published.items()}
    meta = {**run.metadata, "step": run.trainer.step}
    digest = save_checkpoint(
        weights,
        fsutil.join_url(run.out_dir, f"{run.name}.safetensors"),
        run.config,
        meta,
        storage_options=run.storage_options,
    )
    state = {
        "trainer": run.trainer.state_dict(),
        "data_order": run.bank.state_dict(),
        "data_fingerprint": data_fingerprint,
        "history": run.history,
        "identity": json.loads(json.dumps(run.identity, default=str)),
        "wall_s": run.wall_s,
    }
    files.save_state(files.state_url(run.out_dir, run.name), state, run.storage_options)
    return digest


def _train_loop(run: _Run, data_fingerprint: str) -> str:
    """Run to ``run.steps`` total steps (``copgen.train.train_steps``), checkpointing here; returns the
    final weights' sha256. Wall time excludes the checkpoints' I/O."""
    t_start = time.perf_counter()

    def checkpoint() -> None:
        nonlocal t_start
        run.wall_s += time.perf_counter() - t_start
        _checkpoint(run, data_fingerprint)
        t_start = time.perf_counter()

    run.stopped_early = core.train_steps(
        run.trainer, run.bank, steps=run.steps, batch_size=run.batch_size, history=run.history, log=run.log,
        checkpoint=checkpoint, log_every=run.log_every, save_every=run.save_every, deadline=run.deadline,
        name=run.name)
    run.wall_s += time.perf_counter() - t_start
    return _checkpoint(run, data_fingerprint)


def _summary(run: _Run, data: TrainingData, digest: str, part_names: Sequence[str]) -> dict[str, Any]:
    parts = np.asarray(run.history["parts"], dtype=np.float64)
    tail = max(1, len(parts) // 10)
    final_parts = parts[-tail:].mean(axis=0).tolist() if len(parts) else []
    return {
        "config": run.config,
        "optimizer": run.trainer.optim.to_dict(),
        "ema_rate": run.trainer.ema_rate,
        "ema_warmup": run.trainer.ema_warmup,
        "data": data.describe(),
        "steps": run.trainer.step,
        "steps_requested": run.steps,
        "stopped_at_time_limit": run.stopped_early,
        "resumed_from": run.resumed_from,
        "batch_size": run.batch_size,
        "parameters": count_parameters(run.trainer.model),
        "wall_time_s": round(run.wall_s, 3),
        "final_loss": core.loss_summary(run.history["loss"])["last_mean"],
        "final_losses": dict(zip(part_names, final_parts, strict=False)),
        "loss_curve": core.loss_summary(run.history["loss"]),
        "weights": f"{run.name}.safetensors",
        "sha256": digest,
        "metadata": run.metadata,
        "torch": torch.__version__,
    }


def _device_and_autocast(device: str, bf16: bool) -> tuple[torch.device, torch.dtype | None]:
    dev = torch.device(device)
    return dev, (torch.bfloat16 if bf16 else None)


def _deadline(time_limit_s: float | None) -> float | None:
    if time_limit_s is None:
        return None
    if not time_limit_s > 0:
        raise TrainingError(f"time_limit_s must be > 0 seconds, got {time_limit_s}")
    return time.monotonic() + float(time_limit_s)




def _get_data(data: TrainingData | None, job: TrainJob, log: Log) -> TrainingData:
    if data is not None:
        if data.sample_size != job.sample_size:
            raise TrainingError(f"data were cut at {data.sample_size} px, not sample_size={job.sample_size}")
        return data
    return load_training_data(job.source_url, sample_size=job.sample_size, patch=job.patch,
                              max_cells=job.max_cells, storage_options=job.storage_options, log=log,
                              generated_fraction=job.generated_fraction)


def _seeded_model(
    build: Callable[[], torch.nn.Module], what: str, cfg: Mapping[str, Any], job: TrainJob, dev: torch.device,
    init: Callable[..., torch.nn.Module], init_url: str | None,
) -> torch.nn.Module:
    """A model built under the run's seed, optionally loaded from ``init_url`` (which must fit ``cfg``)."""
    try:
        model = core.seeded(build, job.seed).to(dev)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"invalid {what} config {cfg}: {exc}") from exc
    if init_url is not None:
        start = init(init_url, cfg, storage_options=job.storage_options, device=dev)
        model.load_state_dict(start.state_dict(), strict=True)
        del start
    return model


def _finish(run: _Run, data: TrainingData, part_names: Sequence[str]) -> dict[str, Any]:
    """Resume (when asked), train to the end; the run's ``training.json`` entry (not yet written)."""
    if run.resume:
        _resume(run, data.fingerprint())
    digest = _train_loop(run, data.fingerprint())
    return _summary(run, data, digest, part_names)


# ---- public entry points ------------------------------------------------------------------------------


def train_autoencoder(job: TrainJob, *, data: TrainingData | None = None, log: Log = print) -> dict[str, Any]:
    """Train a KL autoencoder (``AutoencoderKL``) on the images of all four modalities pooled (one
    autoencoder serves every modality, as the release's SD VAE) with L1 (+ ``l2_weight`` L2) + KL, as
    ``job.autoencoder`` says (:class:`~copgen.flows.jobs.AutoencoderStage`); ``data``: samples already read
    (else read from ``job.source_url``).

    ``config``: ``AutoencoderKL`` keywords over ``DEFAULT_AUTOENCODER_CONFIG`` (``resolution`` is set to
    ``sample_size``); without a ``scale_factor`` in ``config`` it is set to ``1/std`` of the training
    latents at every save (``estimate_scale_factor``). ``crop``: train on random ``crop`` px crops of the
    samples (cheaper, but the mid-block attention and the group norms then see other statistics than at
    ``sample_size``: finish with full-size steps, e.g. a second run with ``init``).
    ``init``: weights (any URL ``load_autoencoder`` reads) to start from; they must fit ``config``.
    ``job.time_limit_s``: stop the step loop after this many seconds (from the call) and save as at the end;
    the entry says ``stopped_at_time_limit`` and ``resume=True`` continues.
    Saves ``autoencoder.safetensors`` (EMA weights when ``ema_rate`` is set, else the raw ones) +
    ``autoencoder.json`` and the ``autoencoder`` entry of ``training.json``; returns that entry.
    """
    stage, size = job.autoencoder, job.sample_size
    deadline = _deadline(job.time_limit_s)
    cfg = {**DEFAULT_AUTOENCODER_CONFIG, **dict(stage.config or {}), "resolution": int(size)}
    dev, autocast_dtype = _device_and_autocast(job.device, job.bf16)
    ae = _seeded_model(lambda: AutoencoderKL.from_config(cfg), "autoencoder", cfg, job, dev, load_autoencoder,
                       stage.init)
    if size % ae.downsample_factor:
        raise TrainingError(f"sample_size {size} is not a multiple of the downsample {ae.downsample_factor}")
    if stage.crop is not None and stage.crop % ae.downsample_factor:
        raise TrainingError(f"crop {stage.crop} is not a multiple of the downsample {ae.downsample_factor}")
    data = _get_data(data, job, log)
    images = data.images.reshape(-1, size, size, 3)  # every modality's images pooled
    trainer = core.AutoencoderTrainer(
        ae, **stage.losses(), optim=core.OptimConfig(**stage.optim_options()), ema_rate=stage.ema_rate,
        seed=job.seed, autocast_dtype=autocast_dtype,
    )  # fmt: skip
    losses = stage.losses()
    run = _Run(
        name=AUTOENCODER_NAME, job=job, stage=stage, config=dict(ae.config), trainer=trainer,
        bank=core.ImageBank(images, flip=stage.flip, crop=stage.crop), log=log, deadline=deadline,
        metadata={
            "source": data.source, "sample_size": size, "crop": stage.crop, "losses": losses,
            "seed": job.seed,
            "init_from": fsutil.redact_url(stage.init) if stage.init else None,
        },
        identity={"config": dict(ae.config), "seed": job.seed, "losses": losses, "crop": stage.crop},
    )  # fmt: skip
    if (stage.config or {}).get("scale_factor") is None:
        run.before_save = lambda weights: run.config.update(
            scale_factor=estimate_scale_factor(run.config, weights, images, seed=job.seed)
        )
    entry = _finish(run, data, ["l1", "l2", "kl"])
    entry["reconstruction_psnr"] = reconstruction_psnr(run.config, trainer.weights(), data.images)
    log(f"{AUTOENCODER_NAME}: full-size ({size} px) reconstruction PSNR per modality "
        + ", ".join(f"{k} {v:.2f} dB" for k, v in entry["reconstruction_psnr"].items()))
    files.update_training_json(job.out_dir, AUTOENCODER_NAME, entry, job.storage_options)
    return entry


@torch.no_grad()
def estimate_scale_factor(
    config: Mapping[str, Any], weights: Mapping[str, Tensor], images: np.ndarray, *, seed: int = 0,
    max_images: int = 512,
) -> float:
    """``1 / std`` of unscaled posterior samples of (up to ``max_images`` evenly spaced) training images:
    LDM's ``scale_by_std``, so the diffusion model sees latents of unit variance (SD's 0.18215 is this
    number for the SD VAE; a new autoencoder needs its own)."""
    ae = AutoencoderKL.from_config({**dict(config), "scale_factor": 1.0})
    ae.load_state_dict({k: v.float().cpu() for k, v in weights.items()}, strict=True)
    ae.eval()
    pick = np.linspace(0, len(images) - 1, min(len(images), max_images)).round().astype(int)
    moments = core.encode_moments(ae, images[pick])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((moments.shape[0], moments.shape[1] // 2, *moments.shape[2:]), generator=g)
    std = float(core.posterior_sample(moments, noise, 1.0).std())
    if not np.isfinite(std) or std <= 0:
        raise TrainingError(f"cannot estimate the latent scale factor: latent std is {std}")
    return 1.0 / std


@torch.no_grad()
def reconstruction_psnr(
    config: Mapping[str, Any], weights: Mapping[str, Tensor], images: np.ndarray, *, max_samples: int = 64
) -> dict[str, float]:
    """Mean PSNR (dB, uint8 scale) of the posterior-mean round trip at the full sample size, per modality,
    on up to ``max_samples`` evenly spaced training samples (N, M, S, S, 3). Recorded with every trained
    autoencoder: crop-trained weights can look fine in the loss and still fail at the full size."""
    ae = AutoencoderKL.from_config(dict(config))
    ae.load_state_dict({k: v.float().cpu() for k, v in weights.items()}, strict=True)
    ae.eval()
    pick = np.linspace(0, len(images) - 1, min(len(images), max_samples)).round().astype(int)
    out = {}
    for i, m in enumerate(Modality):
        x = images[pick, i]
        moments = core.encode_moments(ae, x)
        mean = moments[:, : moments.shape[1] // 2]
        y = (0.5 * (ae.decoder(ae.post_quant_conv(mean)) + 1)).clamp(0, 1).mul(255).round().to(torch.uint8)
        out[m.name] = round(float(np.mean(psnr(y.permute(0, 2, 3, 1).numpy(), x, max_db=100.0))), 3)
    return out


def network_config_for(
    autoencoder: AutoencoderKL, sample_size: int, config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The network config: ``config`` over ``DEFAULT_NETWORK_CONFIG``, with the latent size and channels
    of ``autoencoder`` at ``sample_size`` (a given ``img_size``/``in_chans`` must agree with them)."""
    cfg = {**DEFAULT_NETWORK_CONFIG, **dict(config or {})}
    if sample_size % autoencoder.downsample_factor:
        raise TrainingError(
            f"sample_size {sample_size} is not a multiple of the autoencoder's downsample "
            f"{autoencoder.downsample_factor}"
        )
    latent = {"img_size": sample_size // autoencoder.downsample_factor, "in_chans": autoencoder.embed_dim}
    for key, value in latent.items():
        if key in cfg and int(cfg[key]) != value:
            raise TrainingError(
                f"network {key}={cfg[key]} does not match the autoencoder's latents ({value})"
            )
    cfg.update(latent)
    return cfg



def train_network(job: TrainJob, *, data: TrainingData | None = None, log: Log = print) -> dict[str, Any]:
    """Train a ``Triffuser`` with the release objective on latents of the autoencoder at
    ``job.autoencoder_weights`` (``job.autoencoder_url``, else the one in ``job.out_dir``), as
    ``job.network`` says (:class:`~copgen.flows.jobs.NetworkStage`); ``data`` as in ``train_autoencoder``.

    Moments are encoded once (both orientations with ``flip``); each step draws a batch in shuffled
    epochs, a posterior sample, one timestep and noise per modality. ``init``: weights (any URL
    ``load_network`` reads) to fine-tune from; they must fit ``config``. ``job.time_limit_s``: as in
    ``train_autoencoder``. ``clean_prob`` > 0 departs from the release objective: each modality is given
    clean (a condition) with that probability (see ``copgen.train.sample_timesteps``). Saves
    ``network.safetensors`` (EMA) + ``network.json`` and the ``network`` entry of ``training.json``;
    returns that entry.
    """
    from copgen.flows.models import load_network

    stage, ae_url = job.network, job.autoencoder_weights
    deadline = _deadline(job.time_limit_s)
    dev, autocast_dtype = _device_and_autocast(job.device, job.bf16)
    ae = load_autoencoder(ae_url, storage_options=job.storage_options, device=dev)
    ae_info = ae.checkpoint_info
    cfg = network_config_for(ae, job.sample_size, stage.config)
    net = _seeded_model(lambda: Triffuser.from_config(cfg), "network", cfg, job, dev, load_network,
                        stage.init)
    data = _get_data(data, job, log)
    bank = _latent_bank(ae, data, stage.flip, autocast_dtype, log)
    del ae
    trainer = core.DiffusionTrainer(
        net, optim=core.OptimConfig(**stage.optim_options()), ema_rate=stage.ema_rate,
        ema_warmup=stage.ema_warmup, seed=job.seed, autocast_dtype=autocast_dtype,
        clean_prob=stage.clean_prob,
    )
    # a local file is not hashed when loaded: hash it here so the network records which autoencoder it needs
    ae_sha = ae_info.sha256 or sha256_of(ae_url, job.storage_options)
    run = _Run(
        name=NETWORK_NAME, job=job, stage=stage, config=cfg, trainer=trainer, bank=bank, log=log,
        deadline=deadline,
        metadata={
            "source": data.source,
            "sample_size": job.sample_size,
            "autoencoder": {"url": ae_info.url, "sha256": ae_sha, "config": ae_info.config},
            "modalities": [m.name for m in Modality],
            "seed": job.seed,
            "init_from": fsutil.redact_url(stage.init) if stage.init else None,
            "clean_prob": stage.clean_prob,
        },
        identity={"config": cfg, "seed": job.seed, "autoencoder_sha256": ae_sha,
                  # only when set: states saved before the option existed still resume
                  **({"clean_prob": stage.clean_prob} if stage.clean_prob else {})},
    )
    entry = _finish(run, data, [m.name for m in Modality])
    files.update_training_json(job.out_dir, NETWORK_NAME, entry, job.storage_options)
    return entry


def _latent_bank(
    ae: AutoencoderKL, data: TrainingData, flip: bool, autocast_dtype: torch.dtype | None, log: Log
) -> core.LatentBank:
    t0 = time.perf_counter()
    n, m = data.images.shape[:2]
    flat = data.images.reshape(n * m, *data.images.shape[2:])
    ae.eval()

    def encode(flipped: bool) -> torch.Tensor:
        moments = core.encode_moments(ae, flat, flip=flipped, autocast_dtype=autocast_dtype)
        return moments.view(n, m, *moments.shape[1:])

    bank = core.LatentBank(encode(False), ae.scale_factor, flipped=encode(True) if flip else None)
    log(f"encoded {n} samples x {m} modalities once in {time.perf_counter() - t0:.1f} s")
    return bank



@flow(name="train", log_prints=True)
def train_flow(
    source_url: str,
    out_dir: str,
    *,
    autoencoder: dict[str, Any] | None = None,
    network: dict[str, Any] | None = None,
    autoencoder_url: str | None = None,
    sample_size: int = 64,
    patch: str = "all",
    max_cells: int | None = None,
    generated_fraction: float | None = None,
    seed: int = 0,
    resume: bool = False,
    device: str = "cpu",
    bf16: bool = False,
    time_limit_s: float | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Training (the deployable entry point): plain parameters, so a deployment can carry them; they map
    to a :class:`~copgen.flows.jobs.TrainJob` exactly as the CLI's options do (``autoencoder``/``network``:
    a stage's settings by name, e.g. ``{"steps": 500, "init": "ae.safetensors"}``); see ``run_training``."""
    job = TrainJob.from_options(
        source_url=source_url, out_dir=out_dir, autoencoder=autoencoder, network=network,
        autoencoder_url=autoencoder_url, sample_size=sample_size, patch=patch, max_cells=max_cells,
        generated_fraction=generated_fraction, seed=seed, resume=resume, device=device, bf16=bf16,
        time_limit_s=time_limit_s, storage_options=storage_options,
    )  # fmt: skip
    return run_training(job)


def run_training(job: TrainJob, *, log: Log = print) -> dict[str, Any]:
    """Train the autoencoder (skipped when ``job.autoencoder_url`` is given), then the network, on one
    source; the data are read once. ``job.time_limit_s`` is for the whole run; a model that reaches it saves
    a resumable checkpoint (the network may then get no steps).
    Returns ``{"autoencoder": entry or None, "network": entry}``."""
    deadline = _deadline(job.time_limit_s)
    left = lambda: None if deadline is None else max(deadline - time.monotonic(), 1e-3)  # noqa: E731
    data = load_training_data(
        job.source_url, sample_size=job.sample_size, patch=job.patch, max_cells=job.max_cells,
        storage_options=job.storage_options, generated_fraction=job.generated_fraction, log=log,
    )  # fmt: skip
    ae_entry = None
    if job.autoencoder_url is None:
        ae_entry = train_autoencoder(replace(job, time_limit_s=left()), data=data, log=log)
    net_entry = train_network(replace(job, time_limit_s=left()), data=data, log=log)
    return {"autoencoder": ae_entry, "network": net_entry}


__all__ = ["DEFAULT_AUTOENCODER_CONFIG", "DEFAULT_NETWORK_CONFIG", "AutoencoderStage", "NetworkStage",
           "TrainJob", "TrainingData", "TrainingError", "estimate_scale_factor", "load_training_data",
           "network_config_for", "reconstruction_psnr", "run_training", "train_autoencoder", "train_flow",
           "train_network"]
