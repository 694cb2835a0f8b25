"""The core tests on CUDA: network, autoencoder and sampler vs the reference files; bf16 autocast; training
and ``CopGen`` vs the CPU. Skipped without CUDA; ``COPGEN_TEST_DEVICE=cpu`` (or any torch device string)
runs the same bodies elsewhere, e.g. to check the test logic on a machine without a GPU."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from copgen import train as T
from copgen.autoencoder import AutoencoderKL
from copgen.diffusion import NoiseSchedule
from copgen.generate import CopGen, sample_latents
from copgen.modalities import Modality
from copgen.model import Triffuser
from safetensors.torch import load_file
from tolerances import DEVICE_SAMPLING_SLACK, recommended

DEVICE = torch.device(os.environ.get("COPGEN_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.usefixtures("single_thread"),  # the CPU halves of the comparisons (tests/core/conftest.py)
]
@pytest.fixture
def strict_fp32():
    """TF32 off, restored after: on Ampere+ fp32 matmuls/convolutions would otherwise keep 10 bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def net(tiny) -> Triffuser:
    """A copy of the reference tiny network on DEVICE (``tiny`` itself stays on the CPU)."""
    return copy.deepcopy(tiny).to(DEVICE)


@pytest.fixture(scope="module")
def io(reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "triffuser_tiny_io.safetensors")


@pytest.fixture(scope="module")
def ae_sidecar(reference_dir) -> dict:
    return json.loads((reference_dir / "autoencoder_tiny.json").read_text())


@pytest.fixture(scope="module")
def autoencoder(reference_dir, ae_sidecar) -> AutoencoderKL:
    ae = AutoencoderKL.from_config(ae_sidecar)  # the reference tiny autoencoder, on the CPU
    ae.load_state_dict(load_file(reference_dir / "autoencoder_tiny.safetensors"), strict=True)
    return ae.eval()


def on(x: torch.Tensor) -> torch.Tensor:  # a (reference, CPU) tensor on DEVICE
    return x.to(DEVICE)


# ---- reference parity ------------------------------------------------------------------------------------


def test_forward_matches_reference(net, io, sidecar, strict_fp32):
    key = "forward eps, h_embed, h_final"
    tol = {"atol": recommended(sidecar, key), "rtol": recommended(sidecar, key, "rtol")}
    with torch.no_grad():
        eps = net(list(on(io["x"])), list(on(io["t"])))
        h_embed = net.embed(on(io["x"]), on(io["t"]))
        h_final = net.trunk(h_embed)
    assert eps[0].device.type == DEVICE.type  # it really ran there
    torch.testing.assert_close(torch.stack(eps).cpu(), io["eps"], **tol)
    torch.testing.assert_close(h_embed.cpu(), io["h_embed"], **tol)
    torch.testing.assert_close(h_final.cpu(), io["h_final"], **tol)


@torch.no_grad()
def test_autoencoder_moments_and_decode_match_reference(autoencoder, ae_sidecar, reference_dir, strict_fp32):
    ref = load_file(reference_dir / "autoencoder_tiny_io.safetensors")
    key = "moments, decoded"
    tol = {"atol": recommended(ae_sidecar, key), "rtol": recommended(ae_sidecar, key, "rtol")}
    ae = copy.deepcopy(autoencoder).to(DEVICE)
    moments = ae.encode_moments(on(ref["image"]))
    assert moments.device.type == DEVICE.type
    torch.testing.assert_close(moments.cpu(), ref["moments"], **tol)
    torch.testing.assert_close(ae.decode(on(ref["z_fixed"])).cpu(), ref["decoded"], **tol)


def run_scenario(net, sampling: dict, name: str, schedule: NoiseSchedule) -> tuple[torch.Tensor, ...]:
    """Run one stored reference scenario (as test_generate.py's ``Scenario``) with every tensor on DEVICE;
    returns the evaluation time points and the generated latents (stacked in target order), on the CPU."""
    get = lambda key: sampling[f"{name}.{key}"]  # noqa: E731
    gen = [Modality(int(i)) for i in get("gen_idx")]
    cond = [Modality(int(i)) for i in get("cond_idx")]
    ignored = [m for m in Modality if m not in gen and m not in cond]
    stored = sampling.get(f"{name}.ignored_noise")
    assert (stored is not None) == bool(ignored), f"{name}: ignored noise stored iff modalities ignored"
    ignored_noise = None if stored is None else (lambda k, m, s=on(stored): s[k, ignored.index(m)])
    times: list[float] = []
    out = sample_latents(
        net, {m: on(get("cond_latents")[j]) for j, m in enumerate(cond)}, gen,
        {m: on(get("init_noise")[j]) for j, m in enumerate(gen)}, steps=get("nfe_t").numel(),
        solver="release", ignored_noise=ignored_noise, schedule=schedule,
        on_evaluation=lambda k, t, x, eps: times.append(float(t[0])),
    )  # fmt: skip
    assert out[gen[0]].device.type == DEVICE.type
    return torch.tensor(times), torch.stack([out[m] for m in gen]).cpu()


def test_release_sampler_reproduces_every_reference_scenario(net, sidecar, reference_dir, strict_fp32):
    sampling = load_file(reference_dir / "triffuser_tiny_sampling.safetensors")
    atol = DEVICE_SAMPLING_SLACK * recommended(sidecar, "sampling generated")
    rtol = DEVICE_SAMPLING_SLACK * recommended(sidecar, "sampling generated", "rtol")
    atol_t = recommended(sidecar, "sampling nfe_t")  # time points come from the CPU schedule: not loosened
    schedule = NoiseSchedule(sampling["betas"].numpy())
    names = sorted(k.removesuffix(".gen_idx") for k in sampling if k.endswith(".gen_idx"))
    assert names, "no scenarios in the sampling file"
    for name in names:
        times, generated = run_scenario(net, sampling, name, schedule)
        torch.testing.assert_close(times, sampling[f"{name}.nfe_t"], atol=atol_t, rtol=0, msg=name)
        torch.testing.assert_close(generated, sampling[f"{name}.generated"], atol=atol, rtol=rtol, msg=name)


# ---- bf16 autocast ---------------------------------------------------------------------------------------


def test_bf16_autocast_close_to_fp32(net, io, strict_fp32):
    x, t = on(io["x"]), on(io["t"])
    with torch.no_grad():
        ref = net.forward_stacked(x, t)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            low = net.forward_stacked(x, t)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    # bf16 keeps 8 mantissa bits (~0.4 % per value): a few percent overall is rounding, not a bug.
    rel = float((low.float() - ref).norm() / ref.norm())
    assert rel < 3e-2, f"bf16 autocast deviates by {rel:.4f} (relative L2) from fp32"


# ---- training (the tiny setup of test_train.py) ----------------------------------------------------------

M, C, S = 4, 4, 4  # modalities, latent channels, latent side of the tiny training network


def fixed_moments(n: int = 12, seed: int = 1) -> torch.Tensor:
    """(n, M, 2C, S, S) moments as in test_train.py: smooth means differing by modality, small std."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, S)
    base = torch.randn(n, 1, C, 1, 1, generator=g) + ramp.view(1, 1, 1, 1, S) * ramp.view(1, 1, 1, S, 1)
    mean = base * torch.arange(1, M + 1).view(1, M, 1, 1, 1) / M
    return torch.cat([mean, torch.full_like(mean, -6.0)], dim=2)


def train_run(device: torch.device, steps: int = 30) -> tuple[list[float], float, float]:
    """Losses of ``steps`` train steps on ``device`` and a fixed evaluation loss before and after. All
    random numbers come from CPU generators, so both devices see the same batches, timesteps and noise."""
    cfg = dict(img_size=S, in_chans=C, patch_size=1, embed_dim=32, depth=2, num_heads=2, num_modalities=M)
    net = T.seeded(lambda: Triffuser(**cfg), 0).to(device)
    bank = T.LatentBank(fixed_moments(), scale_factor=1.0)
    trainer = T.DiffusionTrainer(net, optim=T.OptimConfig(lr=1e-3, warmup_steps=0), ema_rate=0.9, seed=0)
    eval_g = torch.Generator().manual_seed(99)
    x_eval = bank.batch(12, eval_g)
    n_eval, eps_eval = T.sample_timesteps(M, 12, eval_g), torch.randn(x_eval.shape, generator=eval_g)

    def eval_loss() -> float:
        with torch.no_grad():
            out = T.diffusion_loss(net, x_eval.to(device), eval_g, timesteps=n_eval, noise=eps_eval)
            return float(out.total)

    before = eval_loss()
    losses = [trainer.train_step(bank.batch(6, trainer.generator))["loss"] for _ in range(steps)]
    return losses, before, eval_loss()


def test_training_on_device_follows_the_cpu_run_and_reduces_the_loss(strict_fp32):
    dev_losses, dev_before, dev_after = train_run(DEVICE)
    cpu_losses, cpu_before, cpu_after = train_run(torch.device("cpu"))
    # Same weights, batch, timesteps and noise: the first loss differs only by kernel rounding (~1e-6).
    assert dev_before == pytest.approx(cpu_before, rel=1e-4)
    assert dev_losses[0] == pytest.approx(cpu_losses[0], rel=1e-4)
    # Rounding differences feed back through AdamW; on this tiny run they stay ~1e-7 relative (a 1e-6
    # weight perturbation on the CPU), so 1e-3 leaves a wide margin yet catches a wrong step on the device.
    np.testing.assert_allclose(dev_losses, cpu_losses, rtol=1e-3)
    assert dev_after == pytest.approx(cpu_after, rel=1e-3)
    assert dev_after < 0.6 * dev_before, (dev_before, dev_after)  # as test_loss_decreases_on_a_tiny_...
    assert np.mean(dev_losses[-5:]) < np.mean(dev_losses[:5])


# ---- the image-level API ---------------------------------------------------------------------------------


def test_copgen_on_device_generates_the_cpu_images(autoencoder, strict_fp32):
    """``CopGen(device=...)``: noise is drawn on the CPU from per-sample seeds, so a device run with the
    same seeds must give the CPU's images up to rounding (a uint8 level here and there)."""
    latent = autoencoder.config["resolution"] // autoencoder.downsample_factor
    torch.manual_seed(0)  # the test_generate.py ``copgen`` network: weights scaled so every input matters
    net = Triffuser(img_size=latent, in_chans=autoencoder.embed_dim, patch_size=2, embed_dim=32, depth=2,
                    num_heads=2)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5 if p.dim() > 1 else 10.0))
    size = autoencoder.config["resolution"]
    imgs = np.random.default_rng(1).integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    seeds, targets = [101, 202, 303], [Modality.DEM, Modality.S1RTC]  # S2L1C ignored: seeded noise
    runs = {}
    for device in (DEVICE, torch.device("cpu")):
        copgen = CopGen(copy.deepcopy(net), copy.deepcopy(autoencoder), device=device, steps=12)
        runs[device.type] = copgen.generate({Modality.S2L2A: imgs}, targets, seeds, return_latents=True)
    (dev_images, dev_latents), (cpu_images, cpu_latents) = runs[DEVICE.type], runs["cpu"]
    for m in targets:
        torch.testing.assert_close(dev_latents[m], cpu_latents[m], atol=1e-3, rtol=1e-3, msg=m.name)
        assert dev_images[m].shape == cpu_images[m].shape == (3, size, size, 3)
        assert cpu_images[m].std() > 10  # varied images (std ~66): agreement is not that of flat outputs
        diff = np.abs(dev_images[m].astype(np.int16) - cpu_images[m].astype(np.int16))
        assert diff.mean() < 2 and (diff <= 3).mean() > 0.99, (m.name, diff.mean(), diff.max())
