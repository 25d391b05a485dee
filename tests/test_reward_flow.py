"""Tests for reward_finetune on the flow-matching families (FLUX.1, SD3): tiny random pipelines built from configs here
(FluxTransformer2DModel / SD3Transformer2DModel, tiny CLIP and T5 with tokenizers built in the test), end-to-end runs
per reward mode, exact resume, reload in diffusers, the LoRA key format (and ComfyUI's own key mapping at the real
FLUX.1 / SD3.5 shapes when NEARID_COMFYUI names a ComfyUI checkout), and the identity gain of the default reward."""

from __future__ import annotations

import json
import math
import string
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
