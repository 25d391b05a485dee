"""LoRA export for ComfyUI: PEFT / diffusers UNet LoRA keys -> kohya keys, and a model card.

ComfyUI's `LoraLoader` does not load PEFT/diffusers keys (`unet.<module>.lora_A.weight`) for SD1.x/SDXL: it logs
"lora key not loaded" and changes nothing. It does load kohya keys built from the *diffusers* module names, which is
what `to_kohya` writes (ComfyUI's `comfy.lora.model_lora_keys_unet` maps `lora_unet_<diffusers name, . -> _>` to the
model weight):

    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
    -> lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (A = down, [r, in])
       lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     (B = up,   [out, r])
       lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha              (scalar)

Both formats scale the update by alpha / rank, so `.alpha` carries PEFT's `lora_alpha` unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

KOHYA_UNET_PREFIX = "lora_unet_"

# (suffix after the module path, "down" | "up"), longest first so that ".lora_A.default.weight" wins over ".weight".
_LORA_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
)
_MODULE_PREFIXES = ("base_model.model.", "unet.")


def split_lora_key(key: str) -> tuple[str, str]:
    """`unet.<module>.lora_A.weight` (or PEFT / old diffusers variants) -> (`<module>`, "down" | "up" | "alpha").

    Raises:
        ValueError: the key is not a UNet LoRA down/up/alpha key (text-encoder LoRA and DoRA are not supported).
    """
    module = None
    for suffix, kind in _LORA_SUFFIXES:
        if key.endswith(suffix):
            module, part = key[: -len(suffix)], kind
            break
    if module is None and key.endswith(".alpha"):
        module, part = key[: -len(".alpha")], "alpha"
    if module is None:
        raise ValueError(f"{key!r} is not a LoRA down/up/alpha key (expected e.g. '<module>.lora_A.weight').")
    if module.startswith(("text_encoder", "lora_te")):
        raise ValueError(f"{key!r}: only UNet LoRA keys can be exported; text-encoder LoRA is not supported.")
    for prefix in _MODULE_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
    return module, part


def kohya_name(module: str) -> str:
    """Diffusers UNet module path -> kohya prefix (`down_blocks.1...to_q` -> `lora_unet_down_blocks_1_..._to_q`)."""
    return KOHYA_UNET_PREFIX + module.replace(".", "_")


def to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """UNet LoRA state dict with diffusers/PEFT keys -> kohya keys ComfyUI's LoraLoader loads without warnings.

    Args:
        state_dict: `unet.<module>.lora_A.weight` / `lora_B` (what `pipe.save_lora_weights` writes), PEFT keys
            (`<module>.lora_A[.default].weight`, `base_model.model.` prefix) or old diffusers `.lora.down/.lora.up`.
        alpha: PEFT `lora_alpha`, one number or one per module path; default: `.alpha` keys of the input, else the
            rank (scale 1, diffusers' default `lora_alpha=rank`).
        dtype: cast the tensors (e.g. torch.float16 to halve the file); default keep.

    Returns:
        {`lora_unet_<module with _>.lora_down.weight`: [r, in(, k, k)], `.lora_up.weight`: [out, r(, 1, 1)],
        `.alpha`: scalar tensor}, contiguous CPU tensors.

    Raises:
        ValueError: unknown keys, a module with only one of down/up, or rank mismatch between down and up.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, part = split_lora_key(key)
        if part in parts.setdefault(module, {}):
            raise ValueError(f"{key!r}: the {part} tensor of module {module!r} appears twice (several adapters?).")
        parts[module][part] = tensor
    out: dict[str, torch.Tensor] = {}
    for module in sorted(parts):
        p = parts[module]
        if "down" not in p or "up" not in p:
            raise ValueError(f"LoRA module {module!r} has {sorted(p)} but needs both down (lora_A) and up (lora_B).")
        rank = p["down"].shape[0]
        if p["up"].shape[1] != rank:
            raise ValueError(f"LoRA module {module!r}: down {tuple(p['down'].shape)} and up {tuple(p['up'].shape)} "
                             "disagree on the rank.")
        if isinstance(alpha, Mapping):
            a = alpha.get(module, rank)
        elif alpha is not None:
            a = alpha
        elif "alpha" in p:
            a = float(p["alpha"])
        else:
            a = rank
        name = kohya_name(module)
        for part, kohya_part in (("down", "lora_down"), ("up", "lora_up")):
            t = p[part].detach().to("cpu", dtype=dtype or p[part].dtype).contiguous()
            out[f"{name}.{kohya_part}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(float(a), dtype=dtype or torch.float32)
    return out


def kohya_key_map(unet: nn.Module) -> dict[str, str]:
    """{kohya prefix: diffusers module path} for every weighted module of a diffusers UNet.

    This is the diffusers-name branch of ComfyUI's `model_lora_keys_unet`: for each UNet weight `<path>.weight` it
    accepts the prefix `lora_unet_<path with . -> _>`. Underscores make the prefix ambiguous on its own, so the way
    back to module names goes through the model. PEFT wrappers (`.base_layer`) are looked through.
    """
    out: dict[str, str] = {}
    for name, param in unet.named_parameters():
        if not name.endswith(".weight") or ".lora_" in name:
            continue
        module = name[: -len(".weight")].replace(".base_layer", "")
        out[kohya_name(module)] = module
    return out


def from_kohya(
    state_dict: Mapping[str, torch.Tensor], unet: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Kohya UNet LoRA -> (diffusers `unet.<module>.lora_A/B.weight` state dict, {module: alpha}).

    Raises:
        KeyError: a kohya prefix matches no module of `unet` (ComfyUI would log "lora key not loaded").
    """
    key_map = kohya_key_map(unet)
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, tensor in state_dict.items():
        prefix, _, part = key.partition(".")
        if prefix not in key_map:
            unknown.append(key)
            continue
        module = key_map[prefix]
        if part == "alpha":
            alphas[module] = float(tensor)
        elif part in ("lora_down.weight", "lora_up.weight"):
            tensors[f"unet.{module}.lora_{'A' if part == 'lora_down.weight' else 'B'}.weight"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} kohya key(s) match no UNet module: {unknown[:5]}")
    return tensors, alphas


@torch.no_grad()
def merge_kohya_lora(unet: nn.Module, state_dict: Mapping[str, torch.Tensor], strength: float = 1.0) -> list[str]:
    """Add a kohya LoRA into the UNet weights the way ComfyUI's LoraLoader patches them (in place).

    `W += strength * (alpha / rank) * up @ down` per module (convolutions: flattened, then reshaped).

    Returns:
        The keys that matched no UNet module (ComfyUI's "lora key not loaded" list); empty when all loaded.
    """
    key_map = kohya_key_map(unet)
    modules = dict(unet.named_modules())
    prefixes = {k.partition(".")[0] for k in state_dict}
    not_loaded = sorted(k for k in state_dict if k.partition(".")[0] not in key_map)
    for prefix in sorted(prefixes & key_map.keys()):
        down, up = state_dict[f"{prefix}.lora_down.weight"], state_dict[f"{prefix}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(state_dict.get(f"{prefix}.alpha", torch.tensor(float(rank))))
        module = modules[key_map[prefix]]
        weight = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
        delta = up.flatten(1).float() @ down.flatten(1).float()
        weight += (strength * alpha / rank * delta).reshape(weight.shape).to(weight.dtype)
    return not_loaded


def save_kohya_lora(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    alpha: float | Mapping[str, float] | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """`to_kohya` + `safetensors.torch.save_file` with kohya-style metadata (`ss_network_dim`, `ss_network_alpha`)."""
    from safetensors.torch import save_file

    kohya = to_kohya(state_dict, alpha=alpha, dtype=dtype)
    ranks = {int(v.shape[0]) for k, v in kohya.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    meta = {"ss_network_module": "networks.lora", "format": "pt"}
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks.pop())
    if len(alphas) == 1:
        meta["ss_network_alpha"] = str(alphas.pop())
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(path), metadata=meta)
    return path


def write_model_card(
    output_dir: str | os.PathLike,
    family: str,
    config,
    identity_rows: Iterable[Mapping[str, object]] = (),
    best: Mapping[str, object] | None = None,
    selected_by: str = "identity_train",
    comfyui_file: str | None = None,
    heldout_references: Iterable[str] = (),
    family_lines: Iterable[str] = (),
) -> Path:
    """A README.md next to the LoRA files: the base model and family, how to load the files, the reward settings,
    the instance images held out of the reward, and the identity curve (training-reference, held-out and mean-pool
    similarity). `config` is the run's `TrainConfig`; `comfyui_file` the file ComfyUI's LoraLoader takes (default the
    kohya copy; FLUX.1 / SD3 take the diffusers file); `family_lines` the family's own settings (bullets)."""
    rows = list(identity_rows)
    c = config
    base_model = c.pretrained_model_name_or_path
    if c.reward_mode == "none":
        reward = "none (plain DreamBooth LoRA)"
    else:
        weight = (f"gradient-norm ratio {c.reward_weight:g}" if c.reward_weighting == "ratio"
                  else f"absolute weight {c.reward_weight:g}")
        reward = (f"`{c.reward_mode}`, {weight}, schedule `{c.reward_schedule}`, {c.reward_num_inference_steps} "
                  f"sampler steps, guidance {c.reward_guidance_scale:g}, eta {c.reward_eta:g}, NearID model "
                  f"`{c.nearid_model}`")
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags: [lora, dreambooth, nearid, identity-reward]",
        "---",
        "",
        f"# NearID identity-reward LoRA for {base_model}",
        "",
        f"* Base model: `{base_model}` (family `{family}`); instance prompt: `{c.instance_prompt}`.",
        f"* Identity reward: {reward}.",
        *family_lines,
        "* diffusers: `pipe.load_lora_weights(\"<this folder>\")` (`pytorch_lora_weights.safetensors`).",
    ]
    if comfyui_file is None:
        lines.append(f"* ComfyUI: copy `{c.kohya_lora_name}` into `models/loras` and use LoraLoader (kohya keys).")
    else:
        lines.append(f"* ComfyUI: copy `{comfyui_file}` into `models/loras` and use LoraLoader (diffusers "
                     "`transformer.*` keys, which ComfyUI maps for this family).")
    heldout = list(heldout_references)
    lines.append("* Held-out identity references (never seen by the reward): "
                 + (", ".join(f"`{h}`" for h in heldout) if heldout else "none") + ".")
    lines.append("")
    def fmt(value):
        return "-" if value in (None, "") else f"{float(value):.4f}"

    if rows:
        lines += ["## Identity of the validation images (cosine, higher is better)", "",
                  "Held-out: NearID to instance images the reward never saw. Mean-pool: SigLIP mean-pooled tokens, "
                  "a similarity the reward does not optimise.", "",
                  "| step | checkpoint | NearID, training refs | NearID, held-out refs | mean-pool |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['checkpoint']} | {fmt(r.get('identity_train'))} | "
                  f"{fmt(r.get('identity_heldout'))} | {fmt(r.get('meanpool_similarity'))} |" for r in rows]
        lines.append("")
    if best:
        lines += [f"Best checkpoint: `{best.get('checkpoint')}` by {selected_by} ({fmt(best.get(selected_by))}).", ""]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path
