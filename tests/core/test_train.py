"""Training objective, EMA, data banks and determinism of ``copgen.train`` on tiny models."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from copgen import train as T
from copgen.autoencoder import AutoencoderKL
from copgen.model import Triffuser

M, C, S = 4, 4, 4  # modalities, latent channels, latent side of the tiny network


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_network(seed: int = 0) -> Triffuser:
    cfg = dict(img_size=S, in_chans=C, patch_size=1, embed_dim=32, depth=2, num_heads=2, num_modalities=M)
    return T.seeded(lambda: Triffuser(**cfg), seed)


def fixed_moments(n: int = 12, seed: int = 1) -> torch.Tensor:
    """(n, M, 2C, S, S) moments: smooth per-sample means that differ by modality, small posterior std."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, S)
    base = torch.randn(n, 1, C, 1, 1, generator=g) + ramp.view(1, 1, 1, 1, S) * ramp.view(1, 1, 1, S, 1)
    mean = base * torch.arange(1, M + 1).view(1, M, 1, 1, 1) / M
    logvar = torch.full_like(mean, -6.0)
    return torch.cat([mean, logvar], dim=2)


def release_abar() -> np.ndarray:
    """ᾱ_n for n = 0..1000 computed independently: SD scaled-linear betas, β_0 = 0."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - np.concatenate([[0.0], betas]))


class Recorder:
    """Wraps a network's forward_stacked and keeps what it was called with and returned."""

    def __init__(self, net: Triffuser) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        inner = net.forward_stacked

        def forward_stacked(x, t):
            out = inner(x, t)
            self.calls.append((x.detach().clone(), t.detach().clone(), out.detach().clone()))
            return out

        net.forward_stacked = forward_stacked


# ---- objective -------------------------------------------------------------------------------------------


def test_schedule_table_matches_release_definition():
    abar = T.alphas_cumprod()
    assert abar.dtype == torch.float64 and abar.numel() == 1001 and abar[0] == 1.0
    np.testing.assert_allclose(abar.numpy(), release_abar(), rtol=1e-12)


def test_noising_network_inputs_and_loss_are_the_release_objective():
    net = tiny_network()
    rec = Recorder(net)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(M, 5, C, S, S, generator=g)
    n = torch.tensor([[1, 1000, 500, 2, 999], [10, 20, 30, 40, 50], [7, 7, 7, 7, 7], [1000, 1, 250, 750, 3]])
    eps = torch.randn(x0.shape, generator=g)
    out = T.diffusion_loss(net, x0, g, timesteps=n, noise=eps)
    (xn, t_seen, pred) = rec.calls[0]
    abar = release_abar()
    a = torch.from_numpy(np.sqrt(abar[n.numpy()])).float()[..., None, None, None]
    s = torch.from_numpy(np.sqrt(1 - abar[n.numpy()])).float()[..., None, None, None]
    torch.testing.assert_close(xn, a * x0 + s * eps, rtol=1e-6, atol=1e-6)
    assert torch.equal(t_seen, n.float())  # the integer n itself, on the 0..1000 scale
    per = ((pred - eps) ** 2).mean(dim=(2, 3, 4)).mean(dim=1)
    torch.testing.assert_close(out.per_modality, per)
    torch.testing.assert_close(out.total.detach(), per.sum())


def test_timesteps_are_independent_per_modality_and_uniform_on_1_to_1000():
    net = tiny_network()
    rec = Recorder(net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(M, 256, C, S, S)
    with torch.no_grad():
        for _ in range(8):
            T.diffusion_loss(net, x0, g)
    t = torch.cat([c[1] for c in rec.calls], dim=1)  # (M, 2048)
    assert t.shape == (M, 8 * 256)
    assert torch.equal(t, t.round()) and t.min() >= 1 and t.max() <= 1000
    assert t.min() < 10 and t.max() > 990  # both ends reached
    assert abs(float(t.mean()) - 500.5) < 20  # uniform mean 500.5, sd of the mean ~ 6.4
    # every sample gets a different timestep per modality, uncorrelated across modalities
    assert (t[0] != t[1]).float().mean() > 0.99
    corr = np.corrcoef(t.numpy())
    assert np.abs(corr[~np.eye(M, dtype=bool)]).max() < 0.1


def test_clean_prob_gives_conditions_at_n0_and_leaves_them_out_of_the_loss():
    # off (0): exactly the release draws, same generator stream
    a = T.sample_timesteps(M, 64, torch.Generator().manual_seed(4))
    b = T.sample_timesteps(M, 64, torch.Generator().manual_seed(4), clean_prob=0.0)
    assert torch.equal(a, b)  # integer timesteps from the same generator stream
    n = T.sample_timesteps(M, 4096, torch.Generator().manual_seed(4), clean_prob=0.5)
    clean = n == 0
    assert not clean.all(dim=0).any()  # every sample keeps a noised modality
    assert 0.3 < float(clean.float().mean()) < 0.45  # 1/2, less the entries kept noised (~1/4 of 1/2)
    assert n[~clean].min() >= 1 and n.max() <= 1000
    # clean entries are conditions: the loss averages each modality over its noised samples only
    net = tiny_network()
    rec = Recorder(net)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(M, 3, C, S, S, generator=g)
    steps = torch.tensor([[0, 500, 0], [10, 0, 30], [7, 7, 7], [0, 0, 900]])
    eps = torch.randn(x0.shape, generator=g)
    out = T.diffusion_loss(net, x0, g, timesteps=steps, noise=eps)
    xn, _, pred = rec.calls[0]
    assert torch.equal(xn[0, 0], x0[0, 0])  # n = 0 is the clean latent: 1·x0 + 0·eps is exact in IEEE
    err = ((pred - eps) ** 2).mean(dim=(2, 3, 4))
    expected = torch.stack([err[0, 1], (err[1, 0] + err[1, 2]) / 2, err[2].mean(), err[3, 2]])
    torch.testing.assert_close(out.per_modality, expected)
    with pytest.raises(T.TrainingError, match="clean_prob"):
        T.DiffusionTrainer(tiny_network(), clean_prob=1.0)


def test_loss_decreases_on_a_tiny_fixed_dataset():
    net = tiny_network()
    bank = T.LatentBank(fixed_moments(), scale_factor=1.0)
    trainer = T.DiffusionTrainer(net, optim=T.OptimConfig(lr=1e-3, warmup_steps=0), ema_rate=0.9, seed=0)
    # a fixed evaluation: same latents, timesteps and noise before and after
    eval_g = torch.Generator().manual_seed(99)
    x_eval = bank.batch(12, eval_g)
    n_eval = T.sample_timesteps(M, 12, eval_g)
    eps_eval = torch.randn(x_eval.shape, generator=eval_g)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(T.diffusion_loss(net, x_eval, eval_g, timesteps=n_eval, noise=eps_eval).total)

    before = eval_loss()
    losses = [trainer.train_step(bank.batch(6, trainer.generator))["loss"] for _ in range(30)]
    after = eval_loss()
    assert after < 0.6 * before, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


# ---- EMA and optimiser -----------------------------------------------------------------------------------


def test_ema_math_and_warmup_schedule():
    lin = torch.nn.Linear(3, 2)
    ema = T.EMA(lin)
    start = {k: v.clone() for k, v in lin.state_dict().items()}
    assert all(torch.equal(ema.shadow[k], start[k]) for k in start)  # starts as a copy (exact)
    expected = {k: v.clone() for k, v in start.items()}
    for step, rate in enumerate([0.5, 0.9, 0.99]):
        with torch.no_grad():
            for p in lin.parameters():
                p.add_(float(step + 1))
        ema.update(lin, rate)
        for k, v in lin.state_dict().items():
            expected[k] = rate * expected[k] + (1 - rate) * v
    for k in expected:
        torch.testing.assert_close(ema.shadow[k], expected[k], rtol=1e-6, atol=1e-6)
    assert ema.state_dict(lin).keys() == lin.state_dict().keys()
    assert T.ema_rate_at(0, 0.9999, warmup=True) == pytest.approx(0.1)
    assert T.ema_rate_at(90, 0.9999, warmup=True) == pytest.approx(0.91)
    assert T.ema_rate_at(10**7, 0.9999, warmup=True) == 0.9999
    assert T.ema_rate_at(0, 0.9999, warmup=False) == 0.9999


def test_trainer_ema_follows_the_parameters_with_its_rate():
    net = tiny_network()
    trainer = T.DiffusionTrainer(net, optim=T.OptimConfig(lr=1e-3, warmup_steps=0), ema_rate=0.75, seed=0)
    bank = T.LatentBank(fixed_moments(), 1.0)
    expected = {k: v.clone() for k, v in net.named_parameters()}
    for _ in range(3):
        trainer.train_step(bank.batch(4, trainer.generator))
        for k, p in net.named_parameters():
            expected[k] = 0.75 * expected[k] + 0.25 * p.detach()
    published = trainer.weights()
    for k in expected:
        torch.testing.assert_close(published[k], expected[k], rtol=1e-5, atol=1e-6)


def test_release_optimiser_and_warmup():
    cfg = T.OptimConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.betas) == (2e-4, 0.03, (0.99, 0.99))
    assert cfg.lr_at(0) == 0.0 and cfg.lr_at(2500) == pytest.approx(1e-4) and cfg.lr_at(10**6) == 2e-4
    trainer = T.DiffusionTrainer(tiny_network(), seed=0)
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (group["weight_decay"], group["betas"]) == (0.03, (0.99, 0.99))
    assert trainer.ema_rate == 0.9999


# ---- determinism and resume -------------------------------------------------------------------------------


def run_steps(seed: int, steps: int, state: dict | None = None) -> tuple[T.DiffusionTrainer, list, dict]:
    optim = T.OptimConfig(lr=1e-3, warmup_steps=2)
    trainer = T.DiffusionTrainer(tiny_network(seed), optim=optim, seed=seed)
    bank = T.LatentBank(fixed_moments(), 1.0, flipped=fixed_moments().flip(-1))
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        bank.load_state_dict(state["bank"])
    losses = [trainer.train_step(bank.batch(5, trainer.generator))["loss"] for _ in range(steps)]
    return trainer, losses, {"trainer": trainer.state_dict(), "bank": bank.state_dict()}


def test_deterministic_for_a_seed_and_resume_continues_exactly():
    a, losses_a, _ = run_steps(7, 6)
    b, losses_b, _ = run_steps(7, 6)
    c, losses_c, _ = run_steps(8, 6)
    # Exact by construction: the same computation twice in one process (and a resume from a byte-exact
    # torch.save round trip continues the same computation); another machine may differ in the last bits.
    assert losses_a == losses_b
    assert losses_a != losses_c
    wa, wb, wc = a.weights(), b.weights(), c.weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # 3 steps, save with torch.save, load with weights_only=True, 3 more == 6 uninterrupted
    _, first, state = run_steps(7, 3)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)
    resumed, second, _ = run_steps(7, 3, restored)
    assert resumed.step == 6
    assert first + second == losses_a
    wr = resumed.weights()
    assert all(torch.equal(wa[k], wr[k]) for k in wa)


def test_incompatible_state_is_a_clear_error():
    _, _, state = run_steps(1, 1)
    wider = Triffuser(img_size=S, in_chans=C, patch_size=1, embed_dim=64, depth=2, num_heads=2)
    other = T.DiffusionTrainer(wider)
    with pytest.raises(T.TrainingError, match="does not fit"):
        other.load_state_dict(state["trainer"])


# ---- data banks ------------------------------------------------------------------------------------------


def test_latent_bank_epochs_flips_and_posterior():
    n = 6
    mean = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1).expand(n, M, C, S, S).clone()
    moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=2)  # std e^-15: samples = scale·mean
    flipped = moments.clone()
    flipped[:, :, :C] = -mean  # marks the other orientation
    bank = T.LatentBank(moments, scale_factor=0.5, flipped=flipped)
    g = torch.Generator().manual_seed(0)
    seen, orientations = [], []
    for _ in range(4):  # 4 batches of 3 = 2 epochs of 6
        z = bank.batch(3, g)
        assert z.shape == (M, 3, C, S, S)
        values = z[:, :, 0, 0, 0] / 0.5  # (M, 3)
        # one orientation for all modalities of a sample
        assert torch.allclose(values, values[:1].expand_as(values), atol=1e-4)
        seen += values[0].abs().round().int().tolist()
        orientations += (values[0] < 0).tolist()
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))  # epochs
    sample0 = [o for s, o in zip(seen, orientations, strict=True) if s != 0]
    assert any(sample0) and not all(sample0)
    with pytest.raises(T.TrainingError, match="larger than"):
        bank.batch(7, g)


def test_image_bank_crops_and_flips_windows_of_the_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    bank = T.ImageBank(images, flip=True, crop=4)
    g = torch.Generator().manual_seed(0)
    full = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    flipped_seen = 0
    for _ in range(6):
        x = bank.batch(5, g)
        assert x.shape == (5, 3, 4, 4)
        for crop in x:  # every crop is a 4x4 window of one image, as is or mirrored
            windows = full.unfold(2, 4, 1).unfold(3, 4, 1)  # (N, 3, 5, 5, 4, 4)
            same = (windows == crop[None, :, None, None]).flatten(4).all(-1).all(1)
            mirrored = (windows.flip(-1) == crop[None, :, None, None]).flatten(4).all(-1).all(1)
            assert bool(same.any() or mirrored.any())
            flipped_seen += int(bool(mirrored.any()) and not bool(same.any()))
    assert flipped_seen > 0
    with pytest.raises(T.TrainingError, match="crop"):
        T.ImageBank(images, crop=9)


def test_posterior_sample_matches_the_autoencoder():
    ae = AutoencoderKL(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, resolution=8)
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(2, 8, 4, 4, generator=g) * 3
    noise = torch.randn(2, 4, 4, 4, generator=g)
    torch.testing.assert_close(T.posterior_sample(moments, noise, ae.scale_factor), ae.sample(moments, noise))


def test_kl_divergence_closed_form():
    mean = torch.tensor([[[[0.0]], [[1.0]]]])  # (1, 2, 1, 1)
    logvar = torch.tensor([[[[0.0]], [[np.log(2.0)]]]])
    kl = T.kl_divergence(torch.cat([mean, logvar], dim=1))
    # 0.5·(μ² + σ² − 1 − log σ²) summed: channel 0 → 0, channel 1 → 0.5·(1 + 2 − 1 − ln 2)
    assert float(kl[0]) == pytest.approx(0.5 * (2 - np.log(2.0)), rel=1e-6)


def test_autoencoder_training_reduces_reconstruction_error():
    cfg = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, resolution=8)
    ae = T.seeded(lambda: AutoencoderKL(**cfg), 0)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 8)
    images = np.stack([np.stack([np.outer(ramp, np.ones(8)) * f] * 3, -1) for f in rng.uniform(0.2, 1, 16)])
    bank = T.ImageBank(np.clip(images, 0, 255).astype(np.uint8))
    trainer = T.AutoencoderTrainer(ae, seed=0, optim=T.OptimConfig(lr=2e-3, betas=(0.5, 0.9), warmup_steps=0))
    x = bank.batch(16, torch.Generator().manual_seed(1))
    noise = torch.zeros(16, 4, 4, 4)

    def l1() -> float:
        with torch.no_grad():
            return float(T.autoencoder_loss(ae, x, noise).l1)

    before = l1()
    out = [trainer.train_step(bank.batch(8, trainer.generator)) for _ in range(25)]
    assert l1() < 0.6 * before
    assert all(o["kl"] >= 0 for o in out)
