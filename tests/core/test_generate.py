"""Conditional generation: release parity on every reference scenario, seeds, and the image-level API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from copgen import seeds as seeding
from copgen.autoencoder import AutoencoderKL
from copgen.diffusion import NoiseSchedule
from copgen.generate import (
    INITIAL_NOISE_STREAM,
    POSTERIOR_STREAM,
    CopGen,
    GenerationError,
    images_to_tensor,
    sample_latents,
    tensor_to_images,
)
from copgen.modalities import Modality
from copgen.model import Triffuser
from cpu_level import refused_below_hardware_level
from safetensors.torch import load_file
from tolerances import assert_uint8_close, recommended

# ---- reference data ---------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("single_thread")  # fixture in tests/core/conftest.py


@pytest.fixture(scope="module")
def sampling(reference_dir) -> dict[str, torch.Tensor]:
    return load_file(reference_dir / "triffuser_tiny_sampling.safetensors")


def scenario_names(sampling: dict[str, torch.Tensor]) -> list[str]:
    names = sorted(k.removesuffix(".gen_idx") for k in sampling if k.endswith(".gen_idx"))
    assert names, "no scenarios in the sampling file"
    return names


class Scenario:
    """One stored reference run, read from the file (never from hard-coded names)."""

    def __init__(self, sampling: dict[str, torch.Tensor], name: str) -> None:
        self.name = name
        get = lambda key: sampling[f"{name}.{key}"]  # noqa: E731
        self.gen = [Modality(int(i)) for i in get("gen_idx")]
        self.cond = [Modality(int(i)) for i in get("cond_idx")]
        self.ignored = [m for m in Modality if m not in self.gen and m not in self.cond]
        self.conditions = {m: get("cond_latents")[j] for j, m in enumerate(self.cond)}
        self.noise = {m: get("init_noise")[j] for j, m in enumerate(self.gen)}
        self.generated = get("generated")
        self.nfe_t, self.nfe_x, self.nfe_eps = get("nfe_t"), get("nfe_x"), get("nfe_eps")
        stored = sampling.get(f"{name}.ignored_noise")
        assert (stored is not None) == bool(self.ignored), (
            f"{name}: ignored noise stored iff modalities ignored"
        )
        self.ignored_noise = None if stored is None else (lambda k, m: stored[k, self.ignored.index(m)])

    def stack(self, out: dict[Modality, torch.Tensor]) -> torch.Tensor:
        assert list(out) == self.gen
        return torch.stack([out[m] for m in self.gen])


# ---- sample_latents vs the reference ----------------------------------------------------------------


def test_release_sampler_reproduces_every_reference_scenario(tiny, sampling, sidecar):
    atol, rtol = (
        recommended(sidecar, "sampling generated"),
        recommended(sidecar, "sampling generated", "rtol"),
    )
    atol_t = recommended(sidecar, "sampling nfe_t")
    atol_trace = recommended(sidecar, "sampling nfe_x / nfe_eps")
    schedule = NoiseSchedule(sampling["betas"].numpy())
    for name in scenario_names(sampling):
        sc = Scenario(sampling, name)
        trace: dict[str, list[torch.Tensor]] = {"t": [], "x": [], "eps": []}

        def record(k, t, x, eps, trace=trace):
            assert k == len(trace["t"])
            trace["t"].append(t[0].clone()), trace["x"].append(x.clone()), trace["eps"].append(eps.clone())

        out = sample_latents(
            tiny, sc.conditions, sc.gen, sc.noise, steps=sc.nfe_t.numel(), solver="release",
            ignored_noise=sc.ignored_noise, schedule=schedule, on_evaluation=record,
        )  # fmt: skip
        torch.testing.assert_close(torch.stack(trace["t"]), sc.nfe_t, atol=atol_t, rtol=0, msg=name)
        torch.testing.assert_close(torch.stack(trace["x"]), sc.nfe_x, atol=atol_trace, rtol=0, msg=name)
        torch.testing.assert_close(torch.stack(trace["eps"]), sc.nfe_eps, atol=atol_trace, rtol=0, msg=name)
        torch.testing.assert_close(sc.stack(out), sc.generated, atol=atol, rtol=rtol, msg=name)
    # The sidecar's tolerance keeps its meaning: plausible mistakes (one step fewer, the other solver)
    # are far outside it (the sidecar measured >= 0.1 for every wrong variant it lists).
    for steps, solver in ((sc.nfe_t.numel() - 1, "release"), (sc.nfe_t.numel(), "2m")):
        wrong = sample_latents(tiny, sc.conditions, sc.gen, sc.noise, steps=steps, solver=solver,
                               ignored_noise=sc.ignored_noise, schedule=schedule)  # fmt: skip
        assert not torch.allclose(sc.stack(wrong), sc.generated, atol=atol, rtol=rtol), (steps, solver)


def test_release_global_rng_path_for_ignored_modalities(tiny, sampling, sidecar):
    """Without injected noise, ignored modalities draw torch.randn(B, C, h, w) from the global RNG per
    evaluation, as the release does: the stored seed reproduces the stored run."""
    atol, rtol = (
        recommended(sidecar, "sampling generated"),
        recommended(sidecar, "sampling generated", "rtol"),
    )
    runs = [s for s in sidecar["sampling"]["scenarios"] if s.get("ignored")]
    assert runs, "the reference set has no scenario with ignored modalities"
    for entry in runs:
        sc = Scenario(sampling, entry["name"])
        with torch.random.fork_rng():
            torch.manual_seed(entry["ignored_noise_torch_manual_seed"])
            out = sample_latents(tiny, sc.conditions, sc.gen, sc.noise, steps=sc.nfe_t.numel())
        torch.testing.assert_close(sc.stack(out), sc.generated, atol=atol, rtol=rtol, msg=sc.name)


def test_multistep_converges_towards_release_solution(tiny, sampling):
    sc = Scenario(sampling, scenario_names(sampling)[0])
    fixed = sc.ignored_noise or (lambda k, m: torch.zeros(1))

    def run(solver: str, steps: int) -> torch.Tensor:
        noise = None if not sc.ignored else (lambda k, m: fixed(0, m))  # frozen: the ODE must be fixed
        return sc.stack(sample_latents(tiny, sc.conditions, sc.gen, sc.noise, steps, solver, noise))

    reference = run("release", 200)
    err = {n: (run("2m", n) - reference).abs().mean().item() for n in (10, 25)}
    assert err[25] < err[10], err
    assert (run("release", 50) - reference).abs().mean().item() < err[10]


def test_per_sample_generators_make_ignored_noise_batch_independent(tiny):
    shape = (tiny.in_chans, tiny.img_size, tiny.img_size)
    sample_seeds = [11, 12, 13]
    cond = {Modality.S2L2A: seeding.randn(sample_seeds, shape, stream="cond")}
    noise = {Modality.S1RTC: seeding.randn(sample_seeds, shape, stream="init")}

    def run(rows: list[int]) -> torch.Tensor:
        gens = [seeding.generator(sample_seeds[i]) for i in rows]
        out = sample_latents(
            tiny, {m: v[rows] for m, v in cond.items()}, [Modality.S1RTC],
            {m: v[rows] for m, v in noise.items()}, steps=9, ignored_noise=gens,
        )  # fmt: skip
        return out[Modality.S1RTC]

    batch = run([0, 1, 2])
    singles = torch.cat([run([i]) for i in range(3)])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run([0]), run([1]), atol=1e-3)


def test_sample_latents_rejects_bad_requests(tiny):
    shape = (2, tiny.in_chans, tiny.img_size, tiny.img_size)
    z = torch.zeros(shape)
    with pytest.raises(GenerationError, match="both condition and target"):
        sample_latents(tiny, {Modality.DEM: z}, [Modality.DEM], {Modality.DEM: z})
    with pytest.raises(GenerationError, match="no initial noise"):
        sample_latents(tiny, {}, [Modality.DEM, Modality.S1RTC], {Modality.DEM: z})
    with pytest.raises(GenerationError, match="condition latent of S2L2A has shape"):
        sample_latents(tiny, {Modality.S2L2A: z[:1]}, [Modality.DEM], {Modality.DEM: z})
    with pytest.raises(GenerationError, match="no target"):
        sample_latents(tiny, {Modality.S2L2A: z}, [], {})
    with pytest.raises(GenerationError, match="generators for a batch"):
        sample_latents(tiny, {}, ["dem"], {Modality.DEM: z}, steps=3, ignored_noise=[torch.Generator()])


# ---- the image-level API with a real (tiny) autoencoder ------------------------------------------------


@pytest.fixture(scope="module")
def autoencoder(reference_dir) -> AutoencoderKL:
    config = json.loads((reference_dir / "autoencoder_tiny.json").read_text())
    ae = AutoencoderKL.from_config(config)
    ae.load_state_dict(load_file(reference_dir / "autoencoder_tiny.safetensors"), strict=True)
    return ae.eval()


@pytest.fixture(scope="module")
def copgen(autoencoder) -> CopGen:
    """A small random Triffuser whose latent size fits the tiny autoencoder; weights scaled so that the
    output depends visibly on every input (the release init would make it nearly constant)."""
    latent = autoencoder.config["resolution"] // autoencoder.downsample_factor
    torch.manual_seed(0)
    net = Triffuser(img_size=latent, in_chans=autoencoder.embed_dim, patch_size=2, embed_dim=32, depth=2,
                    num_heads=2)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5 if p.dim() > 1 else 10.0))
    return CopGen(net, autoencoder, steps=12, solver="release")


def random_images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_images_to_tensor_and_back():
    imgs = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    x = images_to_tensor(imgs)
    assert x.shape == (1, 3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]))
    # exact on any machine: IEEE-rounded arithmetic lands within ~1e-5 of each code, far from a .5 edge
    assert np.array_equal(tensor_to_images(x), imgs)
    grey = images_to_tensor(np.full((2, 4, 4), 7, np.uint8))
    assert grey.shape == (2, 3, 4, 4) and torch.all(grey == grey[:, :1])
    # clamp to [-1, 1], then round half up like torchvision's save_image
    raw = torch.tensor([-3.0, 3.0, 0.0, 1 / 255 - 1]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert tensor_to_images(raw)[0, :, :, 0].tolist() == [[0, 255], [128, 1]]
    with pytest.raises(GenerationError, match="uint8"):
        images_to_tensor(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(GenerationError, match="shape"):
        images_to_tensor(np.zeros((1, 4, 5, 3), np.uint8))


def test_encode_is_a_seeded_posterior_sample(copgen, autoencoder):
    size = autoencoder.config["resolution"]
    imgs = random_images(2, size, 0)
    z = copgen.encode({Modality.S2L2A: imgs}, seeds=[5, 6])[Modality.S2L2A]
    with torch.no_grad():
        moments = autoencoder.encode_moments(images_to_tensor(imgs))
    noise = seeding.randn([5, 6], (z.shape[1], *z.shape[2:]), stream=POSTERIOR_STREAM.format("S2L2A"))
    torch.testing.assert_close(z, autoencoder.sample(moments, noise))
    mean = autoencoder.scale_factor * moments[:, : z.shape[1]]
    assert not torch.allclose(z, mean, atol=1e-3)  # a sample, not the posterior mean


def test_generate_is_batch_independent(copgen, autoencoder):
    size = autoencoder.config["resolution"]
    imgs = random_images(3, size, 1)
    seeds = [101, 202, 303]
    targets = [Modality.DEM, Modality.S1RTC]  # S2L1C is ignored: per-evaluation seeded noise
    images, latents = copgen.generate({Modality.S2L2A: imgs}, targets, seeds, return_latents=True)
    assert set(images) == set(targets) and set(latents) == {*targets, Modality.S2L2A}
    for i, seed in enumerate(seeds):
        alone, alone_latents = copgen.generate({Modality.S2L2A: imgs[i : i + 1]}, targets, [seed], True)
        for m in targets:
            assert alone[m].shape == (1, size, size, 3) and alone[m].dtype == np.uint8
            # fp32 kernels of another batch size may differ in the last bits (CopGen docstring), which
            # can move a uint8 code on a rounding edge: the quantisation rule of tests/tolerances.py
            assert_uint8_close(alone[m][0], images[m][i], f"{m.name} sample {i}")
            torch.testing.assert_close(alone_latents[m][0], latents[m][i], atol=1e-5, rtol=1e-5)
    # the seed, not the position, decides: other seeds give other samples
    other = copgen.generate({Modality.S2L2A: imgs[:1]}, targets, [999], return_latents=True)[1]
    assert not torch.allclose(other[Modality.DEM][0], latents[Modality.DEM][0], atol=1e-3)


def test_latent_conditions_equal_image_conditions(copgen, autoencoder):
    imgs = random_images(2, autoencoder.config["resolution"], 2)
    seeds = [7, 8]
    from_images = copgen.generate({"s2_l2a": imgs}, ["s1_rtc"], seeds, return_latents=True)
    z = from_images[1][Modality.S2L2A]
    from_latents = copgen.generate({Modality.S2L2A: z}, [Modality.S1RTC], seeds, return_latents=True)
    # Exact by construction: the same network calls on the same latents, batch and process.
    assert torch.equal(from_latents[1][Modality.S1RTC], from_images[1][Modality.S1RTC])
    assert np.array_equal(from_latents[0][Modality.S1RTC], from_images[0][Modality.S1RTC])
    # the initial noise is the target's seeded stream
    expected = seeding.randn(seeds, tuple(z.shape[1:]), stream=INITIAL_NOISE_STREAM.format("S1RTC"))
    out = sample_latents(copgen.network, {Modality.S2L2A: z}, [Modality.S1RTC], {Modality.S1RTC: expected},
                         steps=copgen.steps, ignored_noise=[seeding.generator(seeding.derive(s, "ignored"))
                                                            for s in seeds])  # fmt: skip
    assert torch.equal(out[Modality.S1RTC], from_latents[1][Modality.S1RTC])  # the same calls again


def test_generate_2m_and_bf16_run(copgen, autoencoder):
    imgs = random_images(1, autoencoder.config["resolution"], 3)
    fast = CopGen(copgen.network, autoencoder, dtype=torch.bfloat16, steps=6, solver="2m")
    with refused_below_hardware_level():  # torch's AMX bf16 path under a forced lower ATen level
        images, latents = fast.generate({Modality.DEM: imgs}, [Modality.S2L2A], [1], return_latents=True)
    assert images[Modality.S2L2A].dtype == np.uint8
    assert latents[Modality.S2L2A].dtype == torch.float32 and torch.isfinite(latents[Modality.S2L2A]).all()


def test_generate_rejects_bad_requests(copgen, autoencoder):
    size = autoencoder.config["resolution"]
    imgs = random_images(2, size, 4)
    with pytest.raises(GenerationError, match="2 samples but 1 seeds"):
        copgen.generate({Modality.S2L2A: imgs}, [Modality.DEM], [1])
    with pytest.raises(GenerationError, match="both condition and target"):
        copgen.generate({Modality.S2L2A: imgs}, [Modality.S2L2A], [1, 2])
    with pytest.raises(GenerationError, match="S1RTC images of size"):
        copgen.generate({Modality.S1RTC: random_images(2, size * 2, 5)}, [Modality.DEM], [1, 2])
    with pytest.raises(GenerationError, match="condition DEM: expected uint8"):
        copgen.generate({Modality.DEM: [[1, 2]]}, [Modality.S2L2A], [1])
    with pytest.raises(GenerationError, match="no autoencoder"):
        CopGen(copgen.network, None).generate({Modality.DEM: imgs}, [Modality.S2L2A], [1, 2])
