"""Tests for reward_finetune on the flow-matching families (FLUX.1, SD3): tiny random pipelines built from configs here
(FluxTransformer2DModel / SD3Transformer2DModel, tiny CLIP and T5 with tokenizers built in the test), end-to-end runs
per reward mode, exact resume, reload in diffusers, the LoRA key format (and ComfyUI's own key mapping at the real
FLUX.1 / SD3.5 shapes when NEARID_COMFYUI names a ComfyUI checkout), and the identity gain of the default reward."""

from __future__ import annotations

import json
import logging
import math
import os
import string
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
import test_reward_finetune as sd_tests  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from nearid_core import runs  # noqa: E402
from reward_finetune import train  # noqa: E402
from reward_finetune.config import parse_args  # noqa: E402
from reward_finetune.families import family_class  # noqa: E402

PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
T5_WORDS = ["a", "photo", "of", "sks", "dog"]
MAX_SEQUENCE_LENGTH = 8
PROMPT, tiny_text_config, tiny_tokenizer = sd_tests.PROMPT, sd_tests.tiny_text_config, sd_tests.tiny_tokenizer
# fixtures of the SD tests: one torch thread (autouse), the subject images, the NearID scorer
one_thread, instance_dir, scorer = sd_tests.one_thread, sd_tests.instance_dir, sd_tests.scorer


# ----------------------------------------------------------------------------------------------------------------------
# Tiny pipelines
# ----------------------------------------------------------------------------------------------------------------------


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (tokenizers' Unigram model) over a generated vocabulary: the prompt's words plus letters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase] + [("▁" + w, -1.0) for w in T5_WORDS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_t5(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(T5_WORDS) + 30, d_model=d_model, d_kv=d_model // 4, d_ff=37,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0))


def tiny_flow_vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                         latent_channels=4, sample_size=32, shift_factor=shift_factor, scaling_factor=scaling_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def save_tiny_flux(directory: Path, guidance_embeds: bool = True) -> Path:
    """FLUX.1-dev in miniature: 1 double + 1 single block, 4-channel latents packed into 16-channel 2x2 patches,
    the guidance embedding, dynamic shifting."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_flow_vae(0.1159, 0.3611), text_encoder=CLIPTextModel(
        tiny_text_config()), tokenizer=tiny_tokenizer(directory / "_vocab"), text_encoder_2=tiny_t5(32),
        tokenizer_2=tiny_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_sd3(directory: Path) -> Path:
    """SD3 in miniature: 2 MMDiT blocks (the last one context-pre-only), two CLIP-with-projection encoders whose
    penultimate states (32 + 32) are zero-padded to T5's 80, pooled 32 + 32, shift 3."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=80,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=16)
    tokenizer = tiny_tokenizer(directory / "_vocab")

    def clip():
        return CLIPTextModelWithProjection(tiny_text_config(projection_dim=32))

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_flow_vae(0.0609, 1.5305), text_encoder=clip(), tokenizer=tokenizer, text_encoder_2=clip(),
        tokenizer_2=tokenizer, text_encoder_3=tiny_t5(80), tokenizer_3=tiny_t5_tokenizer())
    pipe.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="module")
def model_dirs(flux_dir, sd3_dir) -> dict[str, Path]:
    return {"flux": flux_dir, "sd3": sd3_dir}


def base_args(model_dir: Path, instance_dir: Path, release_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """The SD tests' tiny-run flags (32 px, 3 reward steps, guidance 1) plus a short T5 prompt."""
    return [*sd_tests.base_args(model_dir, instance_dir, release_dir, output_dir), "--max_sequence_length",
            str(MAX_SEQUENCE_LENGTH), *extra]


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "pytorch_lora_weights.safetensors"))


def generate(pipe, guidance_scale: float = 1.0, steps: int = 2, n: int = 1, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe([PROMPT] * n, num_inference_steps=steps, guidance_scale=guidance_scale, height=32, width=32,
                max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


# ----------------------------------------------------------------------------------------------------------------------
# End to end, per family and reward mode
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["refl", "draft", "draft_lv"])
def test_end_to_end_run_per_family_and_mode(tmp_path, model_dirs, instance_dir, release_dir, family, mode):
    extra = {"refl": [], "draft": ["--draft_k", "2"], "draft_lv": ["--draft_lv_n", "2"]}[mode]
    run = train.main(base_args(model_dirs[family], instance_dir, release_dir, tmp_path, "--reward_mode", mode,
                               "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_prompt", PROMPT,
                               *extra))
    assert run.family.name == family and run.global_step == 2
    assert {"denoising_loss", "reward_loss", "identity", "reward_weight"} <= run.logs.keys()
    assert all(math.isfinite(v) for v in run.logs.values() if isinstance(v, float))
    assert [r["checkpoint"] for r in run.identity_log.rows] == ["base", "checkpoint-2"]
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists() and (tmp_path / "README.md").exists()
    assert not (tmp_path / run.config.kohya_lora_name).exists()  # ComfyUI maps the diffusers keys of these families


def test_model_card_names_base_model_reward_and_heldout_identity(tmp_path, flux_dir, instance_dir, release_dir):
    train.main(base_args(flux_dir, instance_dir, release_dir, tmp_path, "--max_train_steps", "1",
                         "--checkpointing_steps", "1", "--validation_prompt", PROMPT))
    card = (tmp_path / "README.md").read_text()
    assert f"base_model: {flux_dir}" in card and "(family `flux`)" in card
    assert "`refl`, gradient-norm ratio 1" in card and "guidance 3.5" in card  # FluxPipeline's default guidance
    assert "Held-out identity references (never seen by the reward): `img2.png`" in card
    assert "weighting scheme `none`" in card and "embedded guidance 3.5 in the denoising loss" in card
    assert "copy `pytorch_lora_weights.safetensors`" in card and "kohya" not in card
    assert "| 1 | checkpoint-1 |" in card


# ----------------------------------------------------------------------------------------------------------------------
# Resume, reload in diffusers, the key format
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["flux", "sd3"])
def resumed_run(request, tmp_path_factory, model_dirs, instance_dir, release_dir):
    """Two steps with a checkpoint at each, then a resume to step 3; and the same 3 steps uninterrupted."""
    family = request.param
    out, straight = tmp_path_factory.mktemp(f"{family}_run"), tmp_path_factory.mktemp(f"{family}_straight")
    args = base_args(model_dirs[family], instance_dir, release_dir, out, "--learning_rate", "1e-2",
                     "--checkpointing_steps", "1", "--reward_eta", "0.5")
    train.main([*args, "--max_train_steps", "2"])
    snapshot = lora_tensors(out)
    train.main([*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    train.main([a if a != str(out) else str(straight) for a in args] + ["--max_train_steps", "3"])
    return family, out, straight, snapshot


def test_resume_continues_exactly_like_an_uninterrupted_run(resumed_run):
    family, out, straight, snapshot = resumed_run
    assert [s for s, _ in runs.checkpoint_dirs(out)] == [1, 2, 3]
    resumed, uninterrupted = lora_tensors(out), lora_tensors(straight)
    assert resumed.keys() == uninterrupted.keys() == snapshot.keys()
    assert any(not torch.equal(snapshot[k], resumed[k]) for k in resumed)  # the resumed step trained on
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=1e-5)


def test_saved_lora_loads_in_a_fresh_pipeline_and_changes_its_output(resumed_run, model_dirs):
    family, out, *_ = resumed_run
    pipe = PIPELINES[family].from_pretrained(model_dirs[family])
    base = generate(pipe)
    pipe.load_lora_weights(str(out))
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    with_lora = generate(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    pipe.unload_lora_weights()
    torch.testing.assert_close(generate(pipe), base)


def test_saved_keys_are_transformer_module_lora_a_and_b(resumed_run, model_dirs):
    """The file holds exactly `transformer.<module>.lora_A/B.weight` for every module peft wrapped (the format
    diffusers' loaders and ComfyUI's Flux / SD3 key maps read), with the adapter config in the header."""
    family, out, *_ = resumed_run
    fam = family_class(family).from_pretrained(str(model_dirs[family]))
    fam.add_lora(rank=4, alpha=4.0, dropout=0.0)
    wrapped = {name for name, module in fam.denoiser.named_modules() if hasattr(module, "lora_A")}
    assert len(wrapped) > 0
    expected = {f"transformer.{m}.lora_{ab}.weight" for m in wrapped for ab in "AB"}
    assert set(lora_tensors(out)) == expected
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])  # what load_lora_weights rebuilds the adapter from
    assert header["transformer.r"] == 4 and header["transformer.lora_alpha"] == 4.0
    assert sorted(header["transformer.target_modules"]) == sorted(fam.lora_target_modules)
    assert all(any(m.endswith(t) for t in fam.lora_target_modules) for m in wrapped)


# ----------------------------------------------------------------------------------------------------------------------
# The default reward raises identity (final LoRA loaded by diffusers, fixed-seed samples, vs a same-seed control)
# ----------------------------------------------------------------------------------------------------------------------


def sample_identity(family: str, model_dir: Path, lora_dir: Path, scorer, references: list[str]) -> float:
    """Mean NearID cosine to the instance images of 8 fixed-seed samples (20 steps, the pipeline's default
    guidance) of a fresh pipeline with the LoRA loaded."""
    pipe = PIPELINES[family].from_pretrained(model_dir)
    pipe.load_lora_weights(str(lora_dir))
    images = generate(pipe, guidance_scale=train.family_class(family).default_guidance_scale, steps=20, n=8)
    return float(scorer.score(references, images).mean())


def identity_gain_runs(tmp_path: Path, family: str, model_dir: Path, instance_dir: Path, release_dir: Path, scorer,
                       modes=("none", "refl"), *extra: str) -> dict[str, float]:
    references = [str(p) for p in train.image_files(instance_dir)]
    measured = {}
    for mode in modes:  # only --reward_mode differs: every reward flag at its default
        out = tmp_path / mode
        run = train.main(["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(instance_dir),
                          "--instance_prompt", PROMPT, "--output_dir", str(out), "--nearid_model", str(release_dir),
                          "--resolution", "32", "--report_to", "none", "--seed", "0", "--max_train_steps", "40",
                          "--learning_rate", "5e-3", "--max_sequence_length", str(MAX_SEQUENCE_LENGTH),
                          "--reward_mode", mode, *extra])
        assert run.config.reward_weighting == "ratio" and run.config.reward_weight == 1.0
        measured[mode] = sample_identity(family, model_dir, out, scorer, references)
    return measured


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_default_reward_raises_identity_over_the_dreambooth_control(tmp_path, family, model_dirs, instance_dir,
                                                                   release_dir, scorer):
    measured = identity_gain_runs(tmp_path, family, model_dirs[family], instance_dir, release_dir, scorer)
    gain = measured["refl"] - measured["none"]
    print(family, "identity of final-LoRA samples:", measured, f"gain {gain:+.4f}")
    assert gain >= 0.02, measured


# ----------------------------------------------------------------------------------------------------------------------
# The reward sampler and the loss, against diffusers' own pipelines and definitions
# ----------------------------------------------------------------------------------------------------------------------


def loaded_family(family: str, model_dir: Path):
    fam = family_class(family).from_pretrained(str(model_dir))
    fam.options.max_sequence_length = MAX_SEQUENCE_LENGTH
    fam.place(torch.device("cpu"), torch.float32)
    return fam


@pytest.mark.parametrize("family, guidance", [("flux", 3.5), ("sd3", 7.0), ("sd3", 1.0)])
def test_reward_sampler_follows_the_pipeline(model_dirs, family, guidance):
    """Euler through the reward sampler (own prompt encoding, packing, schedule with FLUX's dynamic shift, guidance
    embedding or CFG) ends where the family's diffusers pipeline ends from the same noise."""
    fam = loaded_family(family, model_dirs[family])
    uncond = fam.negative_conditioning(1) if guidance > 1 else None
    denoise = fam.denoiser_fn(fam.denoiser, fam.conditioning([PROMPT]), uncond, guidance)
    sampler = fam.reward_sampler(4, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        latents = sampler.initial_latents(1, 32, torch.Generator().manual_seed(0))
        for i in range(4):
            latents = sampler.step(denoise, latents, i)
        expected = fam.pipeline(fam.denoiser)(PROMPT, num_inference_steps=4, guidance_scale=guidance, height=32,
                                              width=32, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent",
                                              generator=torch.Generator().manual_seed(0)).images
    if family == "flux":
        expected = FluxPipeline._unpack_latents(expected, 32, 32, fam.vae_scale)
        assert fam.guidance_embeds and 760 < sampler.timesteps[1] < 890  # shifted by mu (64 tokens): neither
        # the unshifted 750 nor the static shift 3's 900
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-4)


def test_flow_step_x0_renoise_and_eta_keep_the_linear_path(model_dirs):
    """With the exact velocity v = eps - x0, x0 = x_t - sigma * v is exact, re-noising lands on (1 - s) x0 + s eps,
    and a step with any eta in [0, 1] keeps the marginal of the path: x0 scaled by 1 - s', noise of std s'."""
    fam = loaded_family("flux", model_dirs["flux"])
    sampler = fam.reward_sampler(5, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 4, 16, 16, generator=g), torch.randn(64, 4, 16, 16, generator=g)
    sampler.initial_latents(1, 32, g)  # the 32 px schedule
    sigmas = sampler.sigmas
    i = 2
    x_t = (1 - sigmas[i]) * x0 + sigmas[i] * eps

    def oracle(latents, t):
        return eps - x0

    torch.testing.assert_close(sampler.predict_x0(oracle, x_t, i), x0, atol=1e-5, rtol=0)
    for eta in (0.0, 0.5, 1.0):
        out = sampler.step(oracle, x_t, i, eta=eta, generator=torch.Generator().manual_seed(1))
        noise = (out - (1 - sigmas[i + 1]) * x0) / sigmas[i + 1]
        assert abs(float(noise.std()) - 1) < 0.02 and abs(float(noise.mean())) < 0.02, eta
        if eta == 0:
            torch.testing.assert_close(out, x_t + (sigmas[i + 1] - sigmas[i]) * (eps - x0))
        else:  # stochastic, and reproducible from the generator
            again = sampler.step(oracle, x_t, i, eta=eta, generator=torch.Generator().manual_seed(1))
            other = sampler.step(oracle, x_t, i, eta=eta, generator=torch.Generator().manual_seed(2))
            assert torch.equal(out, again) and not torch.equal(out, other)
    renoised = sampler.renoise(x0, i, torch.Generator().manual_seed(3))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(renoised, (1 - sigmas[i]) * x0 + sigmas[i] * noise)


def test_denoising_loss_is_diffusers_flow_matching_loss(model_dirs):
    """weighting 'none': mean over pixels of (v - (noise - x0))^2 with the noise drawn first from the step's
    generator; with precondition_outputs (SD3's default) the loss is on x_t - sigma * v against x0."""
    fam = loaded_family("flux", model_dirs["flux"])
    cond = fam.conditioning([PROMPT, PROMPT])
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    fam.predict = lambda model, latents, t, c: torch.zeros_like(latents)  # a model that predicts v = 0
    loss = fam.denoising_loss(fam.denoiser, x0, cond, torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, ((noise - x0) ** 2).flatten(1).mean(1))
    fam.options.precondition_outputs = True  # then x_t - sigma * 0 = x_t against x0: sigma^2 (noise - x0)^2
    loss = fam.denoising_loss(fam.denoiser, x0, cond, torch.Generator().manual_seed(0))
    ratio = loss / ((noise - x0) ** 2).flatten(1).mean(1)
    train_sigmas = fam.noise_scheduler.sigmas
    assert all(torch.isclose(train_sigmas, r.sqrt(), atol=1e-5).any() for r in ratio)  # sigma^2 of drawn timesteps


def tiny_flow_run(family, model_dir, instance_dir, release_dir, output_dir, *extra):
    return train.setup_run(parse_args(base_args(model_dir, instance_dir, release_dir, output_dir, *extra)))


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("flags", [
    ["--reward_mode", "refl", "--reward_eta", "1.0"],
    ["--reward_mode", "draft", "--draft_k", "2", "--draft_k_distribution", "gaussian", "--reward_eta", "0.5"],
    ["--reward_mode", "draft_lv", "--draft_lv_n", "2", "--reward_guidance_scale", "2"],
], ids=["refl-eta", "alignprop-gaussian-eta", "draft-lv-guidance"])
def test_every_reward_sampler_reaches_the_lora(tmp_path, model_dirs, instance_dir, release_dir, family, flags):
    run = tiny_flow_run(family, model_dirs[family], instance_dir, release_dir, tmp_path, "--gradient_checkpointing",
                        *flags)
    with torch.no_grad():  # LoRA B starts at zero: make it non-zero so that A gets gradients too
        for n, p in run.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    losses, logs = train.reward_loss(run, train.step_generator(0, 0, stream=train.REWARD_STREAM))
    assert losses.shape == ((2,) if "draft_lv" in flags else (1,)) and 0 <= logs["identity"] <= 1 + 1e-6
    losses.mean().backward()
    grads = [p.grad for p in run.trainable]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


# ----------------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline_class, extra, flag", [
    ("FluxPipeline", ["--reward_eta", "1.5"], "--reward_eta"),
    ("StableDiffusion3Pipeline", ["--reward_eta", "2"], "--reward_eta"),
    ("FluxPipeline", ["--max_sequence_length", "513"], "--max_sequence_length"),
    ("FluxPipeline", ["--prediction_type", "epsilon"], "--prediction_type"),
])
def test_family_flags_are_checked_before_loading(tmp_path, instance_dir, pipeline_class, extra, flag):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))  # nothing to load
    args = ["--pretrained_model_name_or_path", str(tmp_path), "--instance_data_dir", str(instance_dir),
            "--instance_prompt", PROMPT, "--report_to", "none", "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(ValueError, match=flag):
        train.main(args)
    assert not (tmp_path / "out").exists()


def test_flow_flags_use_diffusers_spelling_and_family_defaults(tmp_path, flux_dir, sd3_dir, instance_dir,
                                                               release_dir):
    cfg = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(instance_dir),
                      "--instance_prompt", PROMPT, "--report_to", "none", "--guidance_scale", "1", "--weighting_scheme",
                      "logit_normal", "--logit_mean", "0.5", "--logit_std", "2", "--mode_scale", "1.1",
                      "--max_sequence_length", "256", "--precondition_outputs", "0"])
    assert (cfg.guidance_scale, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
            cfg.max_sequence_length, cfg.precondition_outputs) == (1.0, "logit_normal", 0.5, 2.0, 1.1, 256, 0)
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", str(instance_dir),
                    "--instance_prompt", PROMPT, "--weighting_scheme", "uniform"])
    for family, model_dir in (("flux", flux_dir), ("sd3", sd3_dir)):
        args = base_args(model_dir, instance_dir, release_dir, tmp_path / family, "--reward_mode", "none")
        i = args.index("--resolution")
        for flag in ("--reward_guidance_scale", "--validation_guidance_scale"):
            j = args.index(flag)
            args = args[:j] + args[j + 2:]
        run = train.setup_run(parse_args(args[:i] + args[i + 2:]))
        o = run.family.options
        assert run.resolution == 1024 and run.config.reward_guidance_scale == run.config.validation_guidance_scale
        if family == "flux":
            assert (o.weighting_scheme, o.precondition_outputs, o.guidance_scale) == ("none", False, 3.5)
            assert run.config.reward_guidance_scale == 3.5
        else:
            assert (o.weighting_scheme, o.precondition_outputs) == ("logit_normal", True)
            assert run.config.reward_guidance_scale == 7.0


# ----------------------------------------------------------------------------------------------------------------------
# The LoRA files at the real FLUX.1 / SD3.5 shapes: the key format, and ComfyUI's own key mapping
# ----------------------------------------------------------------------------------------------------------------------

REAL_TRANSFORMERS = {  # the transformer/config.json of each hub checkpoint
    "flux1-dev": ("flux", FluxTransformer2DModel, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "sd3.5-large": ("sd3", SD3Transformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "sd3.5-medium": ("sd3", SD3Transformer2DModel, dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
}


def save_real_shape_lora(name: str, directory: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """The family's LoRA file for the real transformer: the transformer on the meta device, the rank-1 LoRA
    materialised on the CPU (random), written by the family's `save_lora`. Returns (family, file tensors)."""
    from accelerate import init_empty_weights
    from peft.tuners.lora import LoraLayer

    family, cls, config = REAL_TRANSFORMERS[name]
    with init_empty_weights(include_buffers=True):  # SD3's positional table alone is 0.9 GB at real size
        transformer = cls(**config)
    fam = family_class(family)([], [], None, transformer, None)
    fam.add_lora(rank=1, alpha=1.0, dropout=0.0)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            for part in (module.lora_A, module.lora_B):
                part.to_empty(device="cpu")
                for p in part.parameters():
                    torch.nn.init.normal_(p)
    fam.save_lora(transformer, directory)
    return fam, lora_tensors(directory)


@pytest.mark.parametrize("name", sorted(REAL_TRANSFORMERS))
def test_real_shape_lora_keys_are_transformer_module_lora_a_and_b(tmp_path, name):
    fam, tensors = save_real_shape_lora(name, tmp_path)
    modules = {n: m for n, m in fam.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert set(tensors) == {f"transformer.{n}.lora_{ab}.weight" for n in modules for ab in "AB"}
    for n, m in modules.items():
        assert tensors[f"transformer.{n}.lora_A.weight"].shape == (1, m.in_features)
        assert tensors[f"transformer.{n}.lora_B.weight"].shape == (m.out_features, 1)


@pytest.fixture
def comfyui(monkeypatch):
    """ComfyUI's `comfy.lora` and `comfy.utils` (and the stand-in `comfy.model_base`) from the checkout named by
    NEARID_COMFYUI; skips without it.

    `comfy.model_base` imports every architecture ComfyUI ships (torchvision, ...); the key mapping only tests the
    model's class, so `comfy.lora` gets a stand-in `comfy.model_base` whose classes are empty. Everything else,
    `model_lora_keys_unet`, `flux_to_diffusers` / `mmdit_to_diffusers` and `load_lora`, is ComfyUI's own code.
    """
    import types

    root = os.environ.get("NEARID_COMFYUI")
    if not root:
        pytest.skip("set NEARID_COMFYUI to a ComfyUI checkout (with einops installed) to run ComfyUI's key mapping")

    def comfy_names():
        return [m for m in sys.modules if m == "comfy" or m.startswith(("comfy.", "comfy_"))]

    before = {name: sys.modules.pop(name) for name in comfy_names()}  # e.g. the node tests' stand-ins
    monkeypatch.syspath_prepend(root)
    monkeypatch.setattr(sys, "argv", ["comfyui", "--cpu"])
    classes: dict[str, type] = {}
    model_base = types.ModuleType("comfy.model_base")
    model_base.__getattr__ = lambda cls: classes.setdefault(cls, type(cls, (), {}))
    sys.modules["comfy.model_base"] = model_base
    try:
        import comfy
        import comfy.options

        comfy.model_base = model_base
        comfy.options.enable_args_parsing()  # --cpu: model_management must not look for CUDA
        import comfy.lora
        import comfy.utils

        yield comfy.lora, comfy.utils, model_base
    finally:
        for name in comfy_names():
            del sys.modules[name]
        sys.modules.update(before)


def comfy_unet_config(name: str) -> dict:
    """The `unet_config` ComfyUI's model detection derives from the checkpoint (the keys its key maps read)."""
    family, _, c = REAL_TRANSFORMERS[name]
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    if family == "flux":
        return {"image_model": "flux", "depth": c["num_layers"], "depth_single_blocks": c["num_single_layers"],
                "hidden_size": hidden, "num_heads": c["num_attention_heads"], "guidance_embed": c["guidance_embeds"]}
    return {"depth": hidden // 64, "num_blocks": c["num_layers"]}


@pytest.mark.parametrize("name", sorted(REAL_TRANSFORMERS))
def test_comfyui_maps_every_key_of_the_real_shape_lora(tmp_path, comfyui, caplog, name):
    comfy_lora, comfy_utils, model_base = comfyui
    _, tensors = save_real_shape_lora(name, tmp_path)
    family = REAL_TRANSFORMERS[name][0]
    config = comfy_unet_config(name)
    to_comfy = (comfy_utils.flux_to_diffusers if family == "flux" else comfy_utils.mmdit_to_diffusers)(
        config, output_prefix="diffusion_model.")
    comfy_weights = {v if isinstance(v, str) else v[0] for v in to_comfy.values()}

    class Model(getattr(model_base, "Flux" if family == "flux" else "SD3")):
        model_config = types_namespace(unet_config=config)

        def state_dict(self):  # the names of ComfyUI's own weights
            return dict.fromkeys(comfy_weights)

    key_map = comfy_lora.model_lora_keys_unet(Model(), {})
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(tensors, key_map)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    print(f"{name}: {len(tensors)} LoRA tensors of {len(modules)} modules; ComfyUI patches {len(patches)} weights; "
          f"unmapped keys: {len(not_loaded)}")
    assert not_loaded == [] and len(patches) == len(modules)
    for module in modules:  # a q / k / v LoRA patches its slice of ComfyUI's fused qkv weight: the sizes agree
        target = key_map[module]
        if isinstance(target, tuple) and target[1] is not None:
            assert tensors[f"{module}.lora_B.weight"].shape[0] == target[1][2], module


def types_namespace(**kwargs):
    import types

    return types.SimpleNamespace(**kwargs)
