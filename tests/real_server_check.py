"""Opt-in check against a real ComfyUI server: every API workflow in workflows/api/ runs with a tiny local model.

    python tests/real_server_check.py --comfyui /path/to/ComfyUI [--python /path/to/comfy/venv/bin/python]

Run it with a Python that has this pack's dependencies (the server's own Python is used for ComfyUI unless
`--python` names another). It works in a scratch base directory (`--base-directory`, kept with `--keep`), so the
ComfyUI checkout is not touched: the pack is symlinked into its `custom_nodes/`, a tiny random NearID model (built as
tests/conftest.py builds its fixtures) goes to `models/nearid/nearid-tiny`, synthetic images to `input/`, and for
workflows that generate images a tiny random SD1.x checkpoint (ComfyUI's own SD1.5 classes, one UNet level, random
weights, ~460 MB) to `models/checkpoints/`. Each workflow's loader is pointed at the tiny model; generation is
shrunk to 64x64 px and 2 steps (`--full-size` keeps the workflow's values). Prints one line per workflow (node
errors from /prompt, execution errors from /history, outputs) and exits 1 when any failed, 2 when the server or the
pack did not load. `--serve` leaves the server running afterwards (for a browser; Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest's tiny-model helpers
sys.path.insert(0, str(ROOT))

PACK_FOLDER = "nearid-toolkit"
TINY_MODEL = "nearid-tiny"
TINY_CHECKPOINT = "nearid-check-tiny-sd15.safetensors"
NEARID_NODES = {"NearIDModelLoader", "NearIDEmbed", "NearIDScore", "NearIDBestOfN", "NearIDThresholdFilter",
                "NearIDAttentionHeatmap", "NearIDIdentityGuidance"}

# Builds the tiny SD1.x checkpoint inside the server's Python (it needs ComfyUI's own classes); argv: ComfyUI, out.
TINY_SD_SCRIPT = r"""
import sys
import torch
from safetensors.torch import save_file
comfyui, out = sys.argv[1:3]
sys.path.insert(0, comfyui)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops, comfy.sd1_clip
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL

unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                 channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=0, context_dim=768,
                 use_linear_in_transformer=False, operations=comfy.ops.disable_weight_init, device="meta")
clip = comfy.sd1_clip.SDClipModel(device="meta")
with torch.device("meta"):
    vae = AutoencoderKL(ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                                      ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
                        embed_dim=4)
g = torch.Generator().manual_seed(0)
sd = {}
for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.", clip), ("first_stage_model.", vae)):
    for key, value in module.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if value.dim() > 1:
            tensor = torch.randn(value.shape, generator=g) / max(1, value[0].numel()) ** 0.5
        else:
            tensor = torch.ones(value.shape) if "norm" in key and key.endswith("weight") else torch.zeros(value.shape)
        sd[prefix + key] = tensor.half()
save_file(sd, out)
"""


# --------------------------------------------------------------------------------------------------------------------
# The scratch base directory
# --------------------------------------------------------------------------------------------------------------------


def toy_image(color: tuple[int, int, int], shift: int = 0, background: tuple[int, int, int] = (222, 208, 180),
              shape: str = "robot", size: int = 256) -> Image.Image:
    """A synthetic photo: a toy (robot or ball) in `color` on a table, shifted right by `shift` pixels."""
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, size * 3 // 4, size, size], fill=tuple(c * 3 // 4 for c in background))  # the table
    x = size // 2 + shift
    if shape == "robot":
        draw.rectangle([x - 40, 110, x + 40, 200], fill=color)  # body
        draw.rectangle([x - 28, 60, x + 28, 106], fill=color)  # head
        draw.ellipse([x - 18, 74, x - 6, 86], fill=(250, 250, 250))
        draw.ellipse([x + 6, 74, x + 18, 86], fill=(250, 250, 250))
        draw.rectangle([x - 60, 120, x - 44, 170], fill=color)  # arms
        draw.rectangle([x + 44, 120, x + 60, 170], fill=color)
    else:
        draw.ellipse([x - 55, 95, x + 55, 205], fill=color)
    return img


def write_inputs(input_dir: Path) -> None:
    """The image files the workflows' Load Image nodes name: a red toy robot as reference, candidates of it and of
    other toys."""
    input_dir.mkdir(parents=True, exist_ok=True)
    red, blue = (200, 40, 40), (40, 80, 200)
    images = {
        "reference.png": toy_image(red),
        "reference_1.png": toy_image(red),
        "reference_2.png": toy_image(red, shift=-30, background=(190, 210, 225)),
        "candidate_1.png": toy_image(red, shift=35),
        "candidate_2.png": toy_image(blue, shift=-20),
        "candidate_3.png": toy_image((60, 160, 70), shape="ball"),
    }
    for name, img in images.items():
        img.save(input_dir / name)


def write_tiny_model(models_dir: Path) -> Path:
    """A tiny random NearID release (the layout users download) in `models/nearid/nearid-tiny`."""
    import nearid_core
    from conftest import TINY_PREPROCESS, tiny_nearid_model

    target = models_dir / "nearid" / TINY_MODEL
    if not (target / "config.json").exists():
        nearid_core.save_release(tiny_nearid_model(1), target, preprocessor_config=TINY_PREPROCESS.to_dict())
    return target


def write_tiny_checkpoint(comfyui: Path, python: str, target: Path) -> None:
    """The tiny SD1.x checkpoint, built by the server's Python from ComfyUI's classes (skipped when present)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-c", TINY_SD_SCRIPT, str(comfyui), str(target)], check=True, cwd=comfyui,
                   stdout=subprocess.DEVNULL)


def prepare_base(base: Path, comfyui: Path, python: str, needs_checkpoint: bool) -> None:
    """Pack symlink, tiny models and input images under `base`."""
    nodes = base / "custom_nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    link = nodes / PACK_FOLDER
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    write_tiny_model(base / "models")
    write_inputs(base / "input")
    if needs_checkpoint:
        write_tiny_checkpoint(comfyui, python, base / "models" / "checkpoints" / TINY_CHECKPOINT)


# --------------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------------


def free_port(port: int = 0) -> int:
    """`port` if nothing listens there (0: any free port); raises OSError when it is taken, so that the check never
    talks to another server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        return s.getsockname()[1]


def get_json(url: str, data: dict | None = None, timeout: float = 30) -> dict:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:  # /prompt answers 400 with the validation errors as JSON
        return json.loads(err.read() or b"{}")


def start_server(comfyui: Path, python: str, base: Path, port: int, log: Path) -> subprocess.Popen:
    args = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
            "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    with open(log, "w") as out:
        return subprocess.Popen(args, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            get_json(url + "/system_stats", timeout=5)
            return True
        except OSError:
            time.sleep(1)
    return False


# --------------------------------------------------------------------------------------------------------------------
# The workflows
# --------------------------------------------------------------------------------------------------------------------


def needs_checkpoint(prompt: dict) -> bool:
    return any(node["class_type"] == "CheckpointLoaderSimple" for node in prompt.values())


def adapt(prompt: dict, full_size: bool) -> dict:
    """The workflow pointed at the tiny models (and, unless `full_size`, generating 64x64 images in 2 steps)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "NearIDModelLoader":
            inputs.update(model=TINY_MODEL, hub_id="", dtype="float32")
        elif kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_CHECKPOINT
        elif kind == "EmptyLatentImage" and not full_size:
            inputs.update(width=64, height=64)
        elif kind == "KSampler" and not full_size:
            inputs["steps"] = 2
    return prompt


def run_workflow(url: str, prompt: dict, timeout: float) -> tuple[bool, str]:
    """Queue `prompt`, wait for it, and say what happened."""
    queued = get_json(url + "/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
    if "prompt_id" not in queued:
        errors = [queued.get("error", {}).get("message", "rejected")]
        for node_id, info in queued.get("node_errors", {}).items():
            errors += [f"node {node_id} ({info.get('class_type')}): {e.get('message')} {e.get('details', '')}".strip()
                       for e in info.get("errors", [])]
        return False, "node errors: " + "; ".join(errors)
    prompt_id, start = queued["prompt_id"], time.monotonic()
    while time.monotonic() - start < timeout:
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            status = entry["status"]
            if status.get("status_str") != "success":
                errors = [f"node {m[1].get('node_id')} ({m[1].get('node_type')}): {m[1].get('exception_message')}"
                          for m in status.get("messages", []) if m[0] == "execution_error"]
                return False, "execution error: " + ("; ".join(errors) or status.get("status_str", "?"))
            return True, f"ok in {time.monotonic() - start:.1f}s; outputs: {describe(entry.get('outputs', {}), prompt)}"
        time.sleep(0.5)
    return False, f"timed out after {timeout:.0f}s"


def describe(outputs: dict, prompt: dict) -> str:
    parts = []
    for node_id, out in sorted(outputs.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0):
        kind = prompt.get(node_id, {}).get("class_type", "?")
        what = [f"{len(v)} {k}" for k, v in out.items() if isinstance(v, list)]
        parts.append(f"{node_id} {kind} ({', '.join(what)})")
    return ", ".join(parts) or "none"


def check_pack_loaded(url: str, log: Path) -> str | None:
    """None when every NearID node is registered; else why not (from the server log)."""
    missing = NEARID_NODES - set(get_json(url + "/object_info", timeout=60))
    if not missing:
        return None
    failed = [line for line in log.read_text(errors="replace").splitlines() if "IMPORT FAILED" in line or "Error" in line]
    return f"NearID nodes missing from /object_info: {sorted(missing)}\n" + "\n".join(failed[-20:])


# --------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (the folder with main.py)")
    parser.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI (default: this one)")
    parser.add_argument("--base", type=Path, help="scratch base directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch base directory")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--full-size", action="store_true", help="keep the workflows' image sizes and steps")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per workflow")
    parser.add_argument("--serve", action="store_true", help="leave the server running after the check")
    args = parser.parse_args(argv)

    comfyui = args.comfyui.resolve()
    if not (comfyui / "main.py").exists():
        parser.error(f"{comfyui} has no main.py: point --comfyui at a ComfyUI checkout")
    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "workflows" / "api").glob("*.json"))}
    base = (args.base or Path(tempfile.mkdtemp(prefix="nearid-comfy-check-"))).resolve()
    keep = args.keep or args.serve or args.base is not None
    print(f"base directory: {base}", flush=True)
    prepare_base(base, comfyui, args.python, any(needs_checkpoint(p) for p in workflows.values()))

    try:
        port = free_port(args.port)
    except OSError:
        parser.error(f"port {args.port} is in use")
    url, log = f"http://127.0.0.1:{port}", base / "comfyui.log"
    server = start_server(comfyui, args.python, base, port, log)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` also stops the server (see `finally`)
    failures = 0
    try:
        if not wait_ready(url, server, timeout=300):
            print(f"FAIL: the server did not start; log {log}:\n{log.read_text(errors='replace')[-3000:]}")
            return 2
        problem = check_pack_loaded(url, log)
        if problem:
            print(f"FAIL: {problem}")
            return 2
        print(f"server {url} up, NearID nodes loaded", flush=True)
        for name, prompt in workflows.items():
            ok, message = run_workflow(url, adapt(prompt, args.full_size), args.timeout)
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {name}: {message}", flush=True)
        print(f"{len(workflows) - failures} passed, {failures} failed")
        if args.serve:
            print(f"serving {url} (Ctrl-C stops it)", flush=True)
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
