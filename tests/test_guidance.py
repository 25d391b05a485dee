"""Identity guidance (nearid_core.guidance, its diffusers adapter and the ComfyUI node): the window, the scale-free
step, the x0 <-> model-output conversion per scheduler type, safety (no weight gradients, inference mode), and the
measured effect on tiny random SD1.5 and FLUX.1 pipelines (fixed seeds, guided vs unguided)."""

from __future__ import annotations

import pytest
import torch

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

# fixtures of the reward tests: one torch thread (autouse), the subject images, the tiny NearID scorer, tiny FLUX.1
one_thread, instance_dir, scorer, flux_dir = sd_tests.one_thread, sd_tests.instance_dir, sd_tests.scorer, \
    flow_tests.flux_dir
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


PIPE_ARGS = {"sd15": dict(guidance_scale=7.5), "flux": dict(guidance_scale=3.5,
                                                             max_sequence_length=flow_tests.MAX_SEQUENCE_LENGTH)}


def sample(pipe, family: str, n: int = 8, steps: int = 20) -> torch.Tensor:
    return pipe([PROMPT] * n, num_inference_steps=steps, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0), **PIPE_ARGS[family]).images


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_zero_gradient_leaves_the_pipeline_output_unchanged(family, sd_pipe, flux_pipe):
    """Model output -> x0 -> (no change) -> model output inside the real pipeline, FLUX's packing included."""
    pipe = sd_pipe if family == "sd15" else flux_pipe
    plain = sample(pipe, family, n=2, steps=4)
    flat = IdentityGuidance(lambda images: images.sum(dim=(1, 2, 3)) * 0.0, pipeline_decoder(pipe), strength=1.0)
    with guided(pipe, flat) as guidance:
        out = sample(pipe, family, n=2, steps=4)
    assert guidance.guided_steps == 4
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    assert "step" not in pipe.scheduler.__dict__ and "prepare_latents" not in pipe.__dict__  # methods restored


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
