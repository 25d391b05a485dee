"""The shipped workflows: API-format copies validated as ComfyUI's /prompt would (against our nodes' INPUT_TYPES and a
hard-coded table of the core nodes they use), and each UI-format file checked against its API copy."""

from __future__ import annotations

import copy
import inspect
import json
import sys
import types
import uuid
from pathlib import Path

import pytest
from workflow_view import WINDOW, canvas_size, node_box, screen_box

import nearid_nodes

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = sorted((ROOT / "workflows").glob("*.json"))
API_FILES = sorted((ROOT / "workflows" / "api").glob("*.json"))
# API copies; UI files are named by their card titles
EXPECTED = {"score_and_rank", "best_of_n", "threshold_split", "identity_guidance"}
THUMBNAIL_MAX_BYTES = 150_000
TEMPLATE_PROPERTY = "nearid_template_model"  # web/nearid.js: the loader takes the server's default model on opening
SOCKET_TYPES = {"IMAGE", "MASK", "LATENT", "MODEL", "CLIP", "VAE", "CONDITIONING", "NEARID_MODEL", "NEARID_EMBEDDING",
                "*"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # editor-only nodes, absent from API format
FILE = "FILE"  # combo over files on the user's machine: any non-empty name

SAMPLERS = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
            "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m",
            "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ipndm", "deis", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]
MAX_RES = 16384

# Core ComfyUI nodes used by the workflows (nodes.py / comfy_extras at ComfyUI 0.3.64): inputs in /object_info order,
# outputs, whether it is an output node, and extra frontend-only widget values serialised after a widget.
CORE_NODES = {
    "LoadImage": dict(required={"image": (FILE, {"image_upload": True})}, outputs=("IMAGE", "MASK"),
                      extras={"image": 1}),
    "ImageBatch": dict(required={"image1": ("IMAGE", {}), "image2": ("IMAGE", {})}, outputs=("IMAGE",)),
    "CheckpointLoaderSimple": dict(required={"ckpt_name": (FILE, {})}, outputs=("MODEL", "CLIP", "VAE")),
    "CLIPTextEncode": dict(required={"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})},
                           outputs=("CONDITIONING",)),
    "EmptyLatentImage": dict(required={"width": ("INT", {"min": 16, "max": MAX_RES}),
                                       "height": ("INT", {"min": 16, "max": MAX_RES}),
                                       "batch_size": ("INT", {"min": 1, "max": 4096})}, outputs=("LATENT",)),
    "KSampler": dict(required={"model": ("MODEL", {}), "seed": ("INT", {"min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                               "steps": ("INT", {"min": 1, "max": 10000}), "cfg": ("FLOAT", {"min": 0.0, "max": 100.0}),
                               "sampler_name": (SAMPLERS, {}), "scheduler": (SCHEDULERS, {}),
                               "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}),
                               "latent_image": ("LATENT", {}), "denoise": ("FLOAT", {"min": 0.0, "max": 1.0})},
                     outputs=("LATENT",), extras={"seed": 1}),
    "VAEDecode": dict(required={"samples": ("LATENT", {}), "vae": ("VAE", {})}, outputs=("IMAGE",)),
    "SaveImage": dict(required={"images": ("IMAGE", {}), "filename_prefix": ("STRING", {})}, outputs=(),
                      output_node=True),
    "PreviewImage": dict(required={"images": ("IMAGE", {})}, outputs=(), output_node=True),
    "PreviewAny": dict(required={"source": ("*", {})}, outputs=(), output_node=True),
}


@pytest.fixture(scope="module")
def node_defs(tmp_path_factory) -> dict[str, dict]:
    """Every node's definition as /object_info would give it, with a stand-in folder_paths (empty models/nearid)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path_factory.mktemp("models"))
    fp.folder_names_and_paths = {}
    fp.add_model_folder_path = lambda name, path, is_default=False: fp.folder_names_and_paths.setdefault(
        name, ([path], set()))
    fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
    fp.get_filename_list = lambda name: []
    saved = sys.modules.get("folder_paths")
    sys.modules["folder_paths"] = fp
    try:
        defs = {name: dict(d, optional=d.get("optional", {})) for name, d in CORE_NODES.items()}
        for name, cls in nearid_nodes.NODE_CLASS_MAPPINGS.items():
            spec = cls.INPUT_TYPES()
            defs[name] = dict(required=spec.get("required", {}), optional=spec.get("optional", {}),
                              outputs=tuple(cls.RETURN_TYPES), output_node=getattr(cls, "OUTPUT_NODE", False),
                              validate=getattr(cls, "VALIDATE_INPUTS", None))
    finally:
        if saved is None:
            sys.modules.pop("folder_paths", None)
        else:
            sys.modules["folder_paths"] = saved
    return defs


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def widget_error(value, kind, options) -> str | None:
    """Why `value` would fail ComfyUI's validation of a widget input, or None."""
    if kind == FILE:
        return None if isinstance(value, str) and value else "expected a file name"
    if isinstance(kind, list):
        return None if value in kind else f"{value!r} not in {kind}"
    if kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"{value!r} is not an INT"
    if kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"{value!r} is not a FLOAT"
    if kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a STRING"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a BOOLEAN"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{value} < min {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{value} > max {options['max']}"
    if kind in SOCKET_TYPES:
        return f"{kind} is a socket: it needs a link, got the constant {value!r}"
    return None


def validate_api(prompt: dict, defs: dict) -> list[str]:
    """What ComfyUI's validate_prompt would reject in an API-format prompt (node types, inputs, links, outputs).

    As in ComfyUI (execution.py validate_inputs), inputs named in a node's VALIDATE_INPUTS skip the dropdown / min /
    max checks: VALIDATE_INPUTS gets their constant values (None when linked) and decides."""
    errors = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node.get('class_type')})"
        if node.get("class_type") not in defs:
            errors.append(f"{where}: unknown class_type")
            continue
        d = defs[node["class_type"]]
        inputs = node.get("inputs", {})
        validator = d.get("validate")
        custom = set(inspect.getfullargspec(validator).args) - {"cls"} if validator else set()
        if custom:
            verdict = validator(**{k: None if is_link(v) else v for k, v in inputs.items() if k in custom})
            if verdict is not True:
                errors.append(f"{where}: custom validation failed: {verdict}")
        for name in d["required"]:
            if name not in inputs:
                errors.append(f"{where}: required input {name!r} missing")
        for name, value in inputs.items():
            spec = d["required"].get(name) or d["optional"].get(name)
            if spec is None:
                errors.append(f"{where}: unknown input {name!r}")
                continue
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if is_link(value):
                src = prompt.get(value[0])
                if src is None or src.get("class_type") not in defs:
                    errors.append(f"{where}.{name}: link to missing node {value[0]}")
                    continue
                outputs = defs[src["class_type"]]["outputs"]
                if not 0 <= value[1] < len(outputs):
                    errors.append(f"{where}.{name}: output {value[1]} of node {value[0]} does not exist")
                    continue
                out_type, in_type = outputs[value[1]], "COMBO" if isinstance(kind, list) or kind == FILE else kind
                if in_type != "*" and out_type != in_type:
                    errors.append(f"{where}.{name}: {out_type} linked to a {in_type} input")
            elif name not in custom:
                problem = widget_error(value, kind, options)
                if problem:
                    errors.append(f"{where}.{name}: {problem}")
    if not any(defs.get(n.get("class_type"), {}).get("output_node") for n in prompt.values()):
        errors.append("no output node: ComfyUI rejects the prompt (prompt_no_outputs)")
    errors += _cycles(prompt)
    return errors


def _cycles(prompt: dict) -> list[str]:
    state: dict[str, int] = {}

    def visit(node_id: str) -> bool:
        if state.get(node_id) == 1:
            return True
        if state.get(node_id) == 2 or node_id not in prompt:
            return False
        state[node_id] = 1
        found = any(visit(v[0]) for v in prompt[node_id].get("inputs", {}).values() if is_link(v))
        state[node_id] = 2
        return found

    return [f"cycle through node {n}" for n in list(prompt) if visit(n)][:1]


def widget_names(defs: dict, class_type: str) -> list[str | None]:
    """Names of the UI widgets_values positions (None = frontend-only value such as control_after_generate)."""
    d = defs[class_type]
    names: list[str | None] = []
    for name, spec in {**d["required"], **d["optional"]}.items():
        if isinstance(spec[0], list) or spec[0] not in SOCKET_TYPES:
            names.append(name)
            names += [None] * d.get("extras", {}).get(name, 0)
    return names


# --------------------------------------------------------------------------------------------------------------------


def api_copy(ui_path: Path) -> Path:
    """The API copy of a UI workflow: 'NearID Best of N.json' -> api/best_of_n.json. (The templates browser of
    ComfyUI's frontend 1.27 titles a pack's template card by its file name, so the UI files carry titles.)"""
    return ROOT / "workflows" / "api" / (ui_path.stem.removeprefix("NearID ").lower().replace(" ", "_") + ".json")


def test_every_use_case_has_a_ui_workflow_and_an_api_copy():
    assert {api_copy(p).stem for p in UI_FILES} == EXPECTED
    assert {p.stem for p in API_FILES} == EXPECTED


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_has_a_small_jpeg_thumbnail(path):
    """The templates browser shows `<name>.jpg` beside the workflow as the card's picture."""
    thumb = path.with_suffix(".jpg")
    assert thumb.exists(), f"{thumb.name} missing"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) < THUMBNAIL_MAX_BYTES


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_opens_with_every_node_in_view(path):
    """At the stored view (`extra.ds`) every node, title bar included, lies on the editor's canvas in a 1600x1000
    window."""
    workflow = load(path)
    ds = workflow["extra"]["ds"]
    assert 0.5 <= ds["scale"] <= 1.0
    width, height = canvas_size(WINDOW)
    for node in workflow["nodes"]:
        x0, y0, x1, y1 = screen_box(node_box(node), ds)
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, (node["type"], (x0, y0, x1, y1))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_template_loaders_take_the_servers_default_model(path):
    """Every model loader of a template carries the property that makes web/nearid.js set its model to the server's
    default when the template is opened (a local model when there is one), besides its other properties."""
    loaders = [n for n in load(path)["nodes"] if n["type"] == "NearIDModelLoader"]
    assert loaders
    for node in loaders:
        assert node["properties"][TEMPLATE_PROPERTY] is True
        assert node["properties"]["Node name for S&R"] == "NearIDModelLoader"
    assert TEMPLATE_PROPERTY not in api_copy(path).read_text()  # API runs keep the model they name


def test_the_frontend_extension_knows_the_template_property():
    script = (ROOT / "web" / "nearid.js").read_text()
    assert f'"{TEMPLATE_PROPERTY}"' in script and "loadedGraphNode" in script


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.stem)
def test_api_workflow_validates(path, node_defs):
    prompt = load(path)
    assert validate_api(prompt, node_defs) == []
    assert any(n["class_type"].startswith("NearID") for n in prompt.values())


def test_validator_catches_broken_prompts(node_defs):
    prompt = load(ROOT / "workflows" / "api" / "best_of_n.json")
    loader = next(k for k, n in prompt.items() if n["class_type"] == "NearIDModelLoader")
    best = next(k for k, n in prompt.items() if n["class_type"] == "NearIDBestOfN")
    cases = {
        "not in": lambda p: p[loader]["inputs"].update(dtype="float64"),
        "> max": lambda p: p[best]["inputs"].update(top_k=10**6),
        "missing": lambda p: p[best]["inputs"].pop("images"),
        "does not exist": lambda p: p[best]["inputs"].update(images=[loader, 3]),
        "NEARID_MODEL linked to a IMAGE": lambda p: p[best]["inputs"].update(images=[loader, 0]),
        "unknown class_type": lambda p: p[loader].update(class_type="NearIDLoaderRenamed"),
        "unknown input": lambda p: p[best]["inputs"].update(k=3),
        "missing node": lambda p: p[best]["inputs"].update(images=["999", 0]),
        "no output node": lambda p: [p.pop(k) for k in [k for k, n in p.items() if n["class_type"] == "SaveImage"
                                                        or n["class_type"] == "PreviewImage"]],
    }
    for expected, mutate in cases.items():
        broken = copy.deepcopy(prompt)
        mutate(broken)
        errors = validate_api(broken, node_defs)
        assert any(expected in e for e in errors), (expected, errors)


def test_saved_workflows_with_the_retired_on_empty_still_validate(node_defs):
    """on_empty "empty batch" (it made the next Save Image raise IndexError) is no longer offered, but workflows saved
    with it are still accepted at queue time and run as "skip downstream"."""
    prompt = load(ROOT / "workflows" / "api" / "threshold_split.json")
    node = next(n for n in prompt.values() if n["class_type"] == "NearIDThresholdFilter")
    on_empty = node_defs["NearIDThresholdFilter"]["required"]["on_empty"][0]
    assert "empty batch" not in on_empty and node["inputs"]["on_empty"] in on_empty
    node["inputs"]["on_empty"] = "empty batch"
    assert validate_api(prompt, node_defs) == []
    node["inputs"]["on_empty"] = "drop"
    assert any("on_empty" in e for e in validate_api(prompt, node_defs))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_matches_its_api_copy(path, node_defs):
    ui = load(path)
    api = load(api_copy(path))
    assert ui["version"] == 0.4 and isinstance(ui["links"], list)
    uuid.UUID(ui.get("id", str(uuid.uuid4())))  # the editor's schema rejects a workflow whose id is not a UUID
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(link[0] for link in ui["links"])
    real = {i: n for i, n in nodes.items() if n["type"] not in FRONTEND_ONLY}
    assert all(n["mode"] == 0 for n in real.values())
    assert {str(i) for i in real} == set(api)
    for node_id, node in real.items():
        assert api[str(node_id)]["class_type"] == node["type"]

    # links: well-formed, typed like the source output, and the same edges as the API copy
    api_links = {(k, name): tuple(v) for k, n in api.items() for name, v in n["inputs"].items() if is_link(v)}
    ui_links = {}
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert link_type == out["type"] == node_defs[nodes[src]["type"]]["outputs"][src_slot]
        assert inp["type"] in ("*", link_type)
        ui_links[(str(dst), inp["name"])] = (str(src), src_slot)
    assert ui_links == api_links
    for node in real.values():
        for inp in node["inputs"]:
            assert inp["link"] is None or any(link[0] == inp["link"] for link in ui["links"])

    # widgets_values: positional over the widget inputs (+ frontend-only values), equal to the API constants
    for node_id, node in real.items():
        names = widget_names(node_defs, node["type"])
        values = node["widgets_values"]
        assert len(values) == len(names), (node["type"], values, names)
        inputs = api[str(node_id)]["inputs"]
        for name, value in zip(names, values):
            if name is None or is_link(inputs.get(name)):
                continue
            assert inputs[name] == value, (node["type"], name)
        assert {k for k, v in inputs.items() if not is_link(v)} <= set(names)
