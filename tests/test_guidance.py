"""Identity guidance (nearid_core.guidance, its diffusers adapter and the ComfyUI node): the window, the scale-free
step, the x0 <-> model-output conversion per scheduler type, safety (no weight gradients, inference mode), and the
measured effect on tiny random SD1.5 and FLUX.1 pipelines (fixed seeds, guided vs unguided)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

import test_nodes  # noqa: E402
import test_reward_finetune as sd_tests  # noqa: E402
import test_reward_flow as flow_tests  # noqa: E402
from nearid_core.guidance import (  # noqa: E402
    DEFAULT_STRENGTH,
    IdentityGuidance,
    make_autograd_safe,
    time_travel,
)
from nearid_core.guidance_diffusers import (  # noqa: E402
    UnsupportedSchedulerError,
    guided,
    pipeline_decoder,
    x0_coefficients,
)
from nearid_nodes.guidance import ADDITIONAL_MODELS_KEY, NearIDIdentityGuidance  # noqa: E402
from nearid_nodes.loader import DEFAULT_CHOICE, NearIDModelLoader  # noqa: E402
from nearid_nodes.scoring import NearIDEmbed  # noqa: E402

# fixtures of the reward tests: one torch thread (autouse), the subject images, the tiny NearID scorer, tiny FLUX.1
one_thread, instance_dir, scorer = sd_tests.one_thread, sd_tests.instance_dir, sd_tests.scorer
flux_dir, sd3_dir, sdxl_dir = flow_tests.flux_dir, flow_tests.sd3_dir, sd_tests.sdxl_dir
fake_comfy, Interrupted = test_nodes.fake_comfy, test_nodes.Interrupted  # ComfyUI stand-ins (sys.modules)
PROMPT = sd_tests.PROMPT


def references(instance_dir) -> list[str]:
    return sorted(str(p) for p in instance_dir.glob("*.png"))


class Recorder:
    """A decode + loss pair that records what guidance asks of them; the loss pulls the images toward `target`."""

    def __init__(self, target: float = 0.5) -> None:
        self.decoded: list[tuple[int, ...]] = []
        self.target = target

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.decoded.append(tuple(latents.shape))
        return torch.tanh(latents[:, :3])

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.target).pow(2).flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------------------------------
# The mechanism
# ----------------------------------------------------------------------------------------------------------------------


def test_window_and_every_n_steps_decide_which_steps_are_guided():
    rec = Recorder()
    guidance = IdentityGuidance(rec.loss, rec.decode, strength=0.1, start=0.2, end=0.6, every_n_steps=2)
    x0 = torch.randn(1, 4, 8, 8)
    guided_steps = []
    for i in range(10):
        out = guidance.guide(x0, progress=i / 10, step=i)
        if out is not x0:
            guided_steps.append(i)
    assert guided_steps == [2, 4, 6] and len(rec.decoded) == 3 and guidance.guided_steps == 3
    assert guidance.active(0.3, None) and not guidance.active(0.7, None)  # an unknown step index counts as on grid
    assert not IdentityGuidance(rec.loss, rec.decode, strength=0.0).active(0.5, 0)


@pytest.mark.parametrize("kwargs, name", [
    ({"strength": -1}, "strength"), ({"start": 0.5, "end": 0.4}, "start"), ({"every_n_steps": 0}, "every_n_steps"),
    ({"decode_scale": 0}, "decode_scale"), ({"max_grad_norm": 0}, "max_grad_norm")])
def test_bad_options_are_refused_by_name(kwargs, name):
    rec = Recorder()
    with pytest.raises(ValueError, match=name):
        IdentityGuidance(rec.loss, rec.decode, **kwargs)


def test_scale_free_step_is_per_sample_and_lowers_the_loss():
    rec = Recorder()
    guidance = IdentityGuidance(rec.loss, rec.decode, strength=0.05)
    x0 = torch.randn(2, 4, 8, 8) * torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)  # two very different latent scales
    out = guidance.guide(x0, 0.5)
    step_rms = (out - x0).pow(2).flatten(1).mean(1).sqrt()
    x0_rms = x0.pow(2).flatten(1).mean(1).sqrt()
    torch.testing.assert_close(step_rms, 0.05 * x0_rms)
    alone = torch.cat([guidance.guide(x0[i:i + 1], 0.5) for i in range(2)])
    torch.testing.assert_close(out, alone)  # a batch is guided as its samples are one by one
    assert (rec.loss(rec.decode(out)) < rec.loss(rec.decode(x0))).all()


def test_raw_step_clips_each_samples_gradient_norm():
    rec = Recorder()
    x0 = torch.randn(2, 4, 8, 8) * 3
    raw = IdentityGuidance(rec.loss, rec.decode, strength=1.0, normalize=False)
    clipped = IdentityGuidance(rec.loss, rec.decode, strength=1.0, normalize=False, max_grad_norm=1e-3)
    grad = raw.gradient(x0)
    torch.testing.assert_close(raw.guide(x0, 0.5), x0 - grad)
    norms = (clipped.guide(x0, 0.5) - x0).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((2,), 1e-3))


def test_a_non_finite_decode_is_warned_about_and_not_followed(caplog):
    rec = Recorder()
    guidance = IdentityGuidance(rec.loss, lambda z: rec.decode(z) * torch.tensor(float("inf")), strength=0.1)
    x0 = torch.randn(1, 4, 8, 8)
    assert guidance.guide(x0, 0.5).equal(x0) and "non-finite" in caplog.text


def test_decode_scale_decodes_smaller_latents():
    rec = Recorder()
    IdentityGuidance(rec.loss, rec.decode, decode_scale=0.5).guide(torch.randn(1, 4, 16, 12), 0.5)
    assert rec.decoded == [(1, 4, 8, 6)]


def test_through_denoiser_differentiates_through_x0_fn():
    rec = Recorder()
    x_t = torch.randn(1, 4, 8, 8)
    cheap = IdentityGuidance(rec.loss, rec.decode)
    forward = IdentityGuidance(rec.loss, rec.decode, through_denoiser=True)
    with pytest.raises(ValueError, match="x0_fn"):
        forward.guide(x_t, 0.5)
    torch.testing.assert_close(forward.gradient(x_t, x_t, lambda x: x), cheap.gradient(x_t))  # x0 = x_t: same
    torch.testing.assert_close(forward.gradient(x_t, x_t, lambda x: 2 * x), 2 * cheap.gradient(2 * x_t))  # chain rule


def test_time_travel_restores_the_marginal_of_the_noisier_level():
    x0 = torch.full((20000, 1), 2.0)
    prev, now = (0.9, 0.3), (0.6, 0.7)  # (signal, noise) scales; now is noisier
    x_prev = prev[0] * x0 + prev[1] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_now = time_travel(x_prev, prev, now, torch.Generator().manual_seed(1))
    assert abs(float(x_now.mean()) - now[0] * 2.0) < 0.02 and abs(float(x_now.std()) - now[1]) < 0.01
    with pytest.raises(ValueError, match="less noisy"):
        time_travel(x_prev, now, prev)


def test_guidance_works_under_inference_mode_with_weights_loaded_there():
    """As in ComfyUI: the decoder was built and the step runs inside torch.inference_mode()."""
    with torch.inference_mode():
        conv = torch.nn.Conv2d(4, 3, 3, padding=1)
        x0 = torch.randn(1, 4, 8, 8)
        guidance = IdentityGuidance(Recorder().loss, lambda z: conv(z))
        with pytest.raises(RuntimeError, match="Inference tensors"):
            guidance.guide(x0, 0.5)
        make_autograd_safe(conv)
        out = guidance.guide(x0, 0.5)
    assert not out.equal(x0) and all(p.grad is None and not p.requires_grad for p in conv.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# diffusers: model output <-> x0 per scheduler type
# ----------------------------------------------------------------------------------------------------------------------

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULERS = {
    "ddim-eps": lambda: DDIMScheduler(**SD_SCHEDULE, clip_sample=False),
    "ddim-v": lambda: DDIMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction"),
    "ddpm": lambda: DDPMScheduler(**SD_SCHEDULE, clip_sample=False),
    "pndm": lambda: PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True),
    "dpm-karras": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULE, use_karras_sigmas=True),
    "euler-eps": lambda: EulerDiscreteScheduler(**SD_SCHEDULE),
    "euler-v": lambda: EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type="v_prediction"),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}


def own_x0(scheduler, output, t, sample):
    """The scheduler's own x0 estimate of one step, where it reports one (else None)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        next_sample = scheduler.step(output, t, sample, return_dict=False)[0]  # Euler: x + (s_next - s) v
        s, s_next = scheduler.sigmas[0], scheduler.sigmas[1]
        return sample - s * (next_sample - sample) / (s_next - s)
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler.convert_model_output(output, sample=sample)
    if isinstance(scheduler, PNDMScheduler):
        return None
    out = scheduler.step(output, t, sample)
    return out.pred_original_sample


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_x0_is_the_schedulers_own_and_the_conversion_inverts_exactly(name):
    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    output = torch.randn(2, 4, 8, 8, generator=gen)
    c_x, c_out = x0_coefficients(scheduler, t, 0)
    x0 = c_x * sample + c_out * output
    torch.testing.assert_close((x0 - c_x * sample) / c_out, output, rtol=1e-5, atol=1e-5)
    if hasattr(scheduler, "_init_step_index"):
        scheduler._init_step_index(t)
    reference = own_x0(scheduler, output, t, sample)
    if reference is not None:
        torch.testing.assert_close(x0, reference.float(), rtol=1e-4, atol=1e-4)


def test_unsupported_schedulers_are_refused_by_name(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd_tests.save_tiny_pipeline(tmp_path / "sd", sdxl=False))
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    rec = Recorder()
    with pytest.raises(UnsupportedSchedulerError, match="HeunDiscreteScheduler.*DDIMScheduler"):
        with guided(pipe, IdentityGuidance(rec.loss, rec.decode)):
            pass
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="flow_prediction")
    with pytest.raises(UnsupportedSchedulerError, match="flow_prediction"):
        with guided(pipe, IdentityGuidance(rec.loss, rec.decode)):
            pass


# ----------------------------------------------------------------------------------------------------------------------
# diffusers: whole pipelines
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    """The reward tests' SD1.5 architecture on the init whose samples leave identity room (control ~0.44)."""
    directory = sd_tests.save_tiny_sd15_with_headroom(tmp_path_factory.mktemp("guidance_sd15"))
    pipe = StableDiffusionPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_pipe(flux_dir):
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPE_ARGS = {"sd15": dict(guidance_scale=7.5), "sdxl": dict(guidance_scale=7.5),
             "flux": dict(guidance_scale=3.5, max_sequence_length=flow_tests.MAX_SEQUENCE_LENGTH),
             "sd3": dict(guidance_scale=7.0, max_sequence_length=flow_tests.MAX_SEQUENCE_LENGTH)}


@pytest.fixture(scope="module")
def pipes(sd_pipe, flux_pipe, sdxl_dir, sd3_dir) -> dict:
    """Every family the reward trainer supports, as an unmodified diffusers pipeline."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    out = {"sd15": sd_pipe, "flux": flux_pipe, "sdxl": StableDiffusionXLPipeline.from_pretrained(sdxl_dir),
           "sd3": StableDiffusion3Pipeline.from_pretrained(sd3_dir)}
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


def sample(pipe, family: str, n: int = 8, steps: int = 20) -> torch.Tensor:
    return pipe([PROMPT] * n, num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0), **PIPE_ARGS[family]).images


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3"])
def test_a_zero_gradient_leaves_the_pipeline_output_unchanged(family, pipes, scorer, instance_dir):
    """Model output -> x0 -> (no change) -> model output inside the real pipeline, FLUX's packing included; a real
    gradient changes it."""
    pipe = pipes[family]
    plain = sample(pipe, family, n=2, steps=4)
    flat = IdentityGuidance(lambda images: images.sum(dim=(1, 2, 3)) * 0.0, pipeline_decoder(pipe), strength=1.0)
    with guided(pipe, flat) as guidance:
        out = sample(pipe, family, n=2, steps=4)
    assert guidance.guided_steps == 4
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert "step" not in pipe.scheduler.__dict__ and "prepare_latents" not in pipe.__dict__  # methods restored
    with guided(pipe, scorer, references(instance_dir), strength=0.05):
        assert not sample(pipe, family, n=2, steps=4).allclose(plain, atol=1e-3)


def test_guidance_never_touches_weights_and_restores_on_error(sd_pipe, scorer, instance_dir):
    weights = {n: p.detach().clone() for n, p in sd_pipe.unet.named_parameters()}
    with guided(sd_pipe, scorer, references(instance_dir)) as guidance:
        sample(sd_pipe, "sd15", n=2, steps=3)
    assert guidance.guided_steps == 3
    modules = [sd_pipe.unet, sd_pipe.vae, sd_pipe.text_encoder, scorer.model]
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert all(p.equal(weights[n]) for n, p in sd_pipe.unet.named_parameters())
    with pytest.raises(KeyboardInterrupt):
        with guided(sd_pipe, scorer, references(instance_dir)):
            raise KeyboardInterrupt
    assert "step" not in sd_pipe.scheduler.__dict__
    with pytest.raises(ValueError, match="through_denoiser"):
        with guided(sd_pipe, scorer, references(instance_dir), through_denoiser=True):
            pass
    with pytest.raises(ValueError, match="references"):
        with guided(sd_pipe, scorer):
            pass


def identity(scorer, refs: list[str], images: torch.Tensor) -> tuple[float, float]:
    """(mean NearID cosine, mean trunk mean-pool cosine) of images to the references."""
    mean_refs = scorer.embed(refs, readout="mean")
    meanpool = scorer.embed_pixels(images, readout="mean") @ mean_refs.T
    return float(scorer.score(refs, images).mean()), float(meanpool.mean())


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_default_guidance_raises_identity_and_more_strength_raises_it_more(family, sd_pipe, flux_pipe, scorer,
                                                                           instance_dir):
    pipe = sd_pipe if family == "sd15" else flux_pipe
    refs = references(instance_dir)
    measured = {0.0: identity(scorer, refs, sample(pipe, family))}
    for strength in (DEFAULT_STRENGTH, 2 * DEFAULT_STRENGTH):
        with guided(pipe, scorer, refs, strength=strength):
            measured[strength] = identity(scorer, refs, sample(pipe, family))
    print(family, "strength: (NearID, mean-pool) =", {s: tuple(round(v, 4) for v in m) for s, m in measured.items()})
    unguided, default, double = (measured[s][0] for s in measured)
    assert default - unguided >= 0.05, measured
    assert double > default, measured


# ----------------------------------------------------------------------------------------------------------------------
# ComfyUI: the NearIDIdentityGuidance node inside a ComfyUI-style sampler (stand-ins for comfy.* from test_nodes)
# ----------------------------------------------------------------------------------------------------------------------

SD_LATENT_SCALE = 0.18215


class DiscreteSampling:
    """ComfyUI's ModelSamplingDiscrete on a DDPM schedule: sigma table, timestep(sigma), percent_to_sigma."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.sigmas.log() - sigma.log()).abs().argmin()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        t = (1.0 - percent) * (len(self.sigmas) - 1)
        low, w = int(t), t - int(t)
        high = min(low + 1, len(self.sigmas) - 1)
        return float(((1 - w) * self.sigmas[low].log() + w * self.sigmas[high].log()).exp())


class BaseModel:
    """comfy.model_base.BaseModel stand-in: the tiny SD1.5 UNet as an epsilon model in ComfyUI's sigma space."""

    def __init__(self, pipe) -> None:
        self.unet = pipe.unet
        self.model_sampling = DiscreteSampling(pipe.scheduler.alphas_cumprod)

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / SD_LATENT_SCALE

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = self.model_sampling.timestep(sigma)
        eps = self.unet(x / (sigma**2 + 1) ** 0.5, t, encoder_hidden_states=context).sample
        return x - sigma * eps


class ModelPatcher:
    """The MODEL socket: comfy.model_patcher.ModelPatcher's clone / post-CFG / additional-model API."""

    def __init__(self, model: BaseModel) -> None:
        self.model, self.model_options, self.additional_models = model, {}, {}

    def clone(self) -> "ModelPatcher":
        n = ModelPatcher(self.model)
        n.model_options = {k: list(v) if isinstance(v, list) else v for k, v in self.model_options.items()}
        n.additional_models = dict(self.additional_models)
        return n

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization: bool = False) -> None:
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function",
                                                                                 []) + [fn]

    def set_additional_models(self, key: str, models: list) -> None:
        self.additional_models[key] = models


class Decoder(torch.nn.Module):
    """A VAE's first_stage_model: decode(z) of unscaled latents -> images in [-1, 1]."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


class VAE:
    """comfy.sd.VAE stand-in whose weights were loaded under inference mode, as a checkpoint loader node's are."""

    def __init__(self, pipe, patcher_cls, latent_channels: int = 4, latent_dim: int = 2) -> None:
        from diffusers import AutoencoderKL

        with torch.inference_mode():
            vae = AutoencoderKL.from_config(pipe.vae.config)
            vae.load_state_dict(pipe.vae.state_dict())
        assert next(vae.parameters()).is_inference()
        self.first_stage_model = Decoder(vae.eval())
        self.vae_dtype, self.latent_channels, self.latent_dim = torch.float32, latent_channels, latent_dim
        self.patcher = patcher_cls(self.first_stage_model, torch.device("cpu"), torch.device("cpu"))


def comfy_sample(patcher: ModelPatcher, pipe, n: int = 4, steps: int = 20, cfg: float = 7.5,
                 seed: int = 0) -> torch.Tensor:
    """ComfyUI's Euler sampler with CFG and the post-CFG hook (comfy.samplers.cfg_function), inside inference mode
    as the KSampler node runs; returns the decoded 32 px images [n, 3, H, W] in 0..1, as VAE Decode does."""
    model = patcher.model
    table = model.model_sampling.sigmas
    sigmas = torch.cat([table.flip(0)[torch.linspace(0, len(table) - 1, steps).round().long()], torch.zeros(1)])
    options = dict(patcher.model_options, transformer_options={"sample_sigmas": sigmas})
    with torch.inference_mode():
        ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        cond, uncond = (e.expand(n, -1, -1) for e in pipe.text_encoder(ids)[0].chunk(2))
        x = torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
        for i in range(steps):
            s = sigmas[i]
            c, u = model.denoise(x, s, cond), model.denoise(x, s, uncond)
            denoised = u + (c - u) * cfg
            for fn in options.get("sampler_post_cfg_function", []):
                denoised = fn({"denoised": denoised, "cond": None, "uncond": None, "cond_scale": cfg, "model": model,
                               "uncond_denoised": u, "cond_denoised": c, "sigma": s.expand(n),
                               "model_options": options, "input": x})
            x = x + (x - denoised) / s * (sigmas[i + 1] - s)
        return ((pipe.vae.decode(x / SD_LATENT_SCALE).sample + 1) / 2).clamp(0, 1)


@pytest.fixture
def comfy_setup(fake_comfy, sd_pipe, release_dir, instance_dir):
    """(fake comfy, MODEL, VAE, NEARID_MODEL handle on device auto (ComfyUI-managed), NEARID_EMBEDDING of the refs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEARID_ALLOW_ANY_MODEL_PATH", "1")
        (handle,) = NearIDModelLoader().load(DEFAULT_CHOICE, "auto", "float32", 4, hub_id=str(release_dir))
    embedding = None
    for path in references(instance_dir):
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)[None]
        (embedding,) = NearIDEmbed().embed(handle, image, embedding)["result"]
    vae = VAE(sd_pipe, fake_comfy.modules["comfy.model_patcher"].ModelPatcher)
    return fake_comfy, ModelPatcher(BaseModel(sd_pipe)), vae, handle, embedding


def patch(comfy_setup, **options):
    _, model, vae, handle, embedding = comfy_setup
    defaults = dict(strength=DEFAULT_STRENGTH, start_percent=0.0, end_percent=1.0)
    with torch.inference_mode():
        (patched,) = NearIDIdentityGuidance().patch(model, handle, vae, reference_embedding=embedding,
                                                     **{**defaults, **options})
    return patched


def test_node_patches_a_clone_and_loads_vae_and_nearid_with_the_model(comfy_setup):
    _, model, vae, handle, _ = comfy_setup
    patched = patch(comfy_setup)
    assert patched is not model and model.model_options == {} and model.additional_models == {}
    assert len(patched.model_options["sampler_post_cfg_function"]) == 1
    assert patched.additional_models[ADDITIONAL_MODELS_KEY] == [vae.patcher, handle.patcher]
    assert NearIDIdentityGuidance.VALIDATE_INPUTS(start_percent=0.6, end_percent=0.4).startswith("start_percent")
    assert NearIDIdentityGuidance.VALIDATE_INPUTS(start_percent=0.2, end_percent=0.4) is True


def test_node_guided_ksampler_raises_identity_under_inference_mode(comfy_setup, sd_pipe, scorer, instance_dir):
    """Batch of 4 with CFG 7.5, weights of the VAE and NearID loaded under inference mode, sampled inside it."""
    fake, model, _, handle, _ = comfy_setup
    refs = references(instance_dir)
    plain = identity(scorer, refs, comfy_sample(model, sd_pipe))
    guided_images = comfy_sample(patch(comfy_setup), sd_pipe)
    guided_score = identity(scorer, refs, guided_images)
    print("ComfyUI sampler (NearID, mean-pool): unguided", plain, "guided", guided_score)
    assert guided_score[0] - plain[0] >= 0.05
    assert fake.loads and all(p.grad is None for p in handle.scorer.model.parameters())
    assert fake.interrupt_checks >= 2 * 20  # before the decode and between decode and NearID, every guided step


def test_node_window_is_comfyuis_percent_of_the_schedule(comfy_setup, sd_pipe):
    patched = patch(comfy_setup, start_percent=0.5, end_percent=1.0, every_n_steps=2)
    guidance = patched.model_options["sampler_post_cfg_function"][0].guidance
    comfy_sample(patched, sd_pipe, n=1, steps=10)
    sampling = patched.model.model_sampling
    table = sampling.sigmas
    sigmas = table.flip(0)[torch.linspace(0, len(table) - 1, 10).round().long()]
    in_window = [i for i, s in enumerate(sigmas) if float(s) <= sampling.percent_to_sigma(0.5) and i % 2 == 0]
    assert guidance.guided_steps == len(in_window) > 0


def test_node_interrupt_stops_mid_guidance(comfy_setup, sd_pipe):
    fake = comfy_setup[0]
    patched = patch(comfy_setup)
    fake.interrupt_checks, fake.interrupt_after = 0, 1  # the check after the first decode raises
    with pytest.raises(Interrupted):
        comfy_sample(patched, sd_pipe, n=1, steps=4)
    assert fake.interrupt_checks == 2


def test_node_never_fails_the_prompt_for_latents_it_cannot_guide(comfy_setup, sd_pipe, monkeypatch, caplog):
    fake, model, _, handle, embedding = comfy_setup
    video_vae = VAE(sd_pipe, fake.modules["comfy.model_patcher"].ModelPatcher, latent_dim=3)
    with torch.inference_mode():
        (patched,) = NearIDIdentityGuidance().patch(model, handle, video_vae, DEFAULT_STRENGTH, 0.0, 1.0,
                                                     reference_embedding=embedding)
    fn = patched.model_options["sampler_post_cfg_function"][0]
    args = {"denoised": torch.randn(1, 4, 2, 4, 4), "sigma": torch.ones(1), "model": model.model, "model_options": {}}
    assert fn(args) is args["denoised"] and "unguided" in caplog.text
    oom = patch(comfy_setup).model_options["sampler_post_cfg_function"][0]

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("test")

    monkeypatch.setattr(oom.vae.first_stage_model, "decode", out_of_memory)
    args["denoised"] = torch.randn(1, 4, 4, 4)
    assert oom(args) is args["denoised"] and "out of memory" in caplog.text
    wrong = VAE(sd_pipe, fake.modules["comfy.model_patcher"].ModelPatcher, latent_channels=16)
    with torch.inference_mode():
        (patched,) = NearIDIdentityGuidance().patch(model, handle, wrong, DEFAULT_STRENGTH, 0.0, 1.0,
                                                     reference_embedding=embedding)
    with pytest.raises(ValueError, match="16-channel"):
        patched.model_options["sampler_post_cfg_function"][0](args)


def test_a_loop_that_owns_the_denoiser_uses_the_forward_form_and_time_travel(sd_pipe, scorer, instance_dir):
    """Universal Guidance's forward form (gradient through the UNet's x0) and FreeDoM's recurrence (each guided step
    taken twice, re-noised back in between) in a DDIM loop written against the mechanism."""
    pipe, refs = sd_pipe, references(instance_dir)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    alphas = scheduler.alphas_cumprod
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 4, True)
    context = torch.cat([uncond, cond])

    def level(t) -> tuple[float, float]:
        a = float(alphas[t]) if t >= 0 else float(scheduler.final_alpha_cumprod)
        return a**0.5, (1 - a) ** 0.5

    def run(guidance: IdentityGuidance | None, recurrence: int = 1) -> torch.Tensor:
        x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        noise = torch.Generator().manual_seed(1)
        for i, t in enumerate(scheduler.timesteps):
            (a, s), prev = level(int(t)), int(t) - 1000 // 10

            def x0_fn(x_t: torch.Tensor) -> torch.Tensor:
                out_u, out_c = pipe.unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=context).sample.chunk(2)
                return (x_t - s * (out_u + 7.5 * (out_c - out_u))) / a

            for r in range(recurrence):
                with torch.no_grad():
                    x0 = x0_fn(x)
                if guidance is not None:
                    x0 = guidance.guide(x0, i / 10, i, x_t=x, x0_fn=x0_fn)
                eps = (x - a * x0) / s
                a_prev, s_prev = level(prev)
                x_next = a_prev * x0 + s_prev * eps
                if r < recurrence - 1:
                    x = time_travel(x_next, (a_prev, s_prev), (a, s), noise)
            x = x_next
        with torch.no_grad():
            return ((pipe.vae.decode(x / SD_LATENT_SCALE).sample + 1) / 2).clamp(0, 1)

    def make() -> IdentityGuidance:
        return IdentityGuidance.from_scorer(scorer, refs, pipeline_decoder(pipe), through_denoiser=True)

    plain = identity(scorer, refs, run(None))[0]
    forward = identity(scorer, refs, run(make()))[0]
    twice = make()
    recurrent = identity(scorer, refs, run(twice, recurrence=2))[0]
    print("owned DDIM loop, NearID: unguided", plain, "forward form", forward, "with recurrence 2", recurrent)
    assert forward - plain >= 0.05 and recurrent - plain >= 0.05 and twice.guided_steps == 20
    assert all(p.grad is None for p in pipe.unet.parameters())
