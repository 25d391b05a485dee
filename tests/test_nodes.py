"""Every NearID node called as ComfyUI calls it: ComfyUI-format tensors, a tiny random NearID model, and stand-ins for
`folder_paths` / `comfy.*` injected through sys.modules (the real ones exist only inside ComfyUI)."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY_PREPROCESS, tiny_nearid_model

import nearid_core
import nearid_nodes
from nearid_core import CheckpointError, NearIDScorer
from nearid_nodes import comfy_env, trunk_cache
from nearid_nodes.heatmap import NearIDAttentionHeatmap
from nearid_nodes.loader import (
    DEFAULT_CHOICE, ModelPathError, NearIDModelHandle, NearIDModelLoader, is_hub_id, model_choices, resolve_model,
    short_name,
)
from nearid_nodes.scoring import (
    LEGACY_ON_EMPTY, ON_EMPTY, NearIDBestOfN, NearIDEmbed, NearIDEmbedding, NearIDScore, NearIDThresholdFilter,
)

ROOT = Path(__file__).resolve().parents[1]
H, W = 40, 48  # candidate size; references use other sizes


# --------------------------------------------------------------------------------------------------------------------
# ComfyUI stand-ins
# --------------------------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class ExecutionBlocker:
    def __init__(self, message):
        self.message = message


class FakeComfy:
    """Records what the nodes ask of ComfyUI."""

    def __init__(self, models_dir: Path) -> None:
        self.loads: list[tuple[list, dict]] = []
        self.progress: list[tuple[int, list[int]]] = []
        self.interrupt_after: int | None = None
        self.interrupt_checks = 0
        self.modules = self._build(models_dir)

    def _build(self, models_dir: Path) -> dict[str, types.ModuleType]:
        fake = self
        fp = types.ModuleType("folder_paths")
        fp.models_dir = str(models_dir)
        fp.folder_names_and_paths = {}

        def add_model_folder_path(name, path, is_default=False):
            paths, _ = fp.folder_names_and_paths.setdefault(name, ([], set()))
            if path not in paths:
                paths.insert(0, path) if is_default else paths.append(path)

        def get_filename_list(name):
            paths, exts = fp.folder_names_and_paths[name]
            out = set()
            for base in paths:
                for root, _, files in os.walk(base, followlinks=True):
                    for f in files:
                        if not exts or os.path.splitext(f)[1].lower() in exts:
                            out.add(os.path.relpath(os.path.join(root, f), base))
            return sorted(out)

        fp.add_model_folder_path = add_model_folder_path
        fp.get_folder_paths = lambda name: list(fp.folder_names_and_paths[name][0])
        fp.get_filename_list = get_filename_list

        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.should_use_fp16 = lambda device=None, **kw: False
        mm.should_use_bf16 = lambda device=None, **kw: False

        def load_models_gpu(models, **kwargs):
            fake.loads.append((list(models), kwargs))
            for patcher in models:
                patcher.model.to(patcher.load_device)

        def throw_exception_if_processing_interrupted():
            fake.interrupt_checks += 1
            if fake.interrupt_after is not None and fake.interrupt_checks > fake.interrupt_after:
                raise Interrupted()

        mm.load_models_gpu = load_models_gpu
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

        mp = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                if not hasattr(model, "device"):  # as ComfyUI's ModelPatcher does: fails on read-only properties
                    model.device = offload_device
                self.model, self.load_device, self.offload_device = model, load_device, offload_device

        mp.ModelPatcher = ModelPatcher

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total):
                self.record = (total, [])
                fake.progress.append(self.record)

            def update(self, value):
                self.record[1].append(value)

        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.__path__ = []
        comfy.model_management, comfy.model_patcher, comfy.utils = mm, mp, utils
        graph_utils = types.ModuleType("comfy_execution.graph_utils")
        graph_utils.ExecutionBlocker = ExecutionBlocker
        return {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.model_patcher": mp,
                "comfy.utils": utils, "comfy_execution.graph_utils": graph_utils}


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path) -> FakeComfy:
    fake = FakeComfy(tmp_path / "models")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


def load_handle(path: Path, dtype: str = "float32", batch_size: int = 3) -> NearIDModelHandle:
    """A handle as the loader makes it, from any path (as if the server owner allowed paths outside the folders)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(comfy_env.ALLOW_ANY_PATH_ENV, "1")
        (out,) = NearIDModelLoader().load(DEFAULT_CHOICE, "cpu", dtype, batch_size, hub_id=str(path))
    return out


@pytest.fixture(scope="module")
def handle(release_dir) -> NearIDModelHandle:
    return load_handle(release_dir)  # release_dir lies outside every model folder


@pytest.fixture(scope="module")
def scorer(release_dir) -> NearIDScorer:
    return NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)


def images(n: int, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch: float32 [n, h, w, 3] in 0..1."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def result(out: dict) -> tuple:
    assert set(out) == {"ui", "result"} and isinstance(out["ui"]["text"], list)
    return out["result"]


# --------------------------------------------------------------------------------------------------------------------
# Package, entry point, node definitions
# --------------------------------------------------------------------------------------------------------------------


def test_root_entry_imports_like_comfyui(monkeypatch):
    """ComfyUI imports the cloned folder by path under a mangled module name; relative imports must work, and
    nothing may need torchvision / torchaudio (blocked here: importing them raises ImportError)."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchaudio", None)
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(nearid_nodes.NODE_CLASS_MAPPINGS)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
        assert (ROOT / module.WEB_DIRECTORY / "nearid.js").is_file()
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_node_ids_are_frozen_and_prefixed():
    assert list(nearid_nodes.NODE_CLASS_MAPPINGS) == [
        "NearIDModelLoader", "NearIDEmbed", "NearIDScore", "NearIDBestOfN", "NearIDThresholdFilter",
        "NearIDAttentionHeatmap", "NearIDIdentityGuidance",
    ]


@pytest.mark.parametrize("node_id", list(nearid_nodes.NODE_CLASS_MAPPINGS))
def test_node_definition(node_id):
    cls = nearid_nodes.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY.startswith("NearID/") and cls.DESCRIPTION
    assert callable(getattr(cls, cls.FUNCTION))
    n = len(cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == n
    assert len(getattr(cls, "OUTPUT_IS_LIST", (False,) * n)) == n
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, (kind, options) in spec.get(section, {}).items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list):
                assert options.get("default", kind[0]) in kind
    if node_id != "NearIDModelLoader":
        assert spec["required"]["nearid_model"][0] == "NEARID_MODEL"


def test_score_semantics_are_documented():
    for cls in (NearIDScore, NearIDBestOfN, NearIDThresholdFilter):
        assert "[-1, 1]" in cls.DESCRIPTION and "100 x cos" in cls.DESCRIPTION


def test_pack_needs_neither_torchvision_nor_torchaudio():
    files = [ROOT / "__init__.py", *(ROOT / "nearid_nodes").glob("*.py"), *(ROOT / "nearid_core").rglob("*.py")]
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torchvision", "torchaudio") for n in names), file


def test_requirements_match_pyproject_without_torch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert sorted(reqs) == sorted(d for d in deps if not d.startswith("torch"))


# --------------------------------------------------------------------------------------------------------------------
# comfy_env outside ComfyUI
# --------------------------------------------------------------------------------------------------------------------


def test_comfy_env_falls_back_outside_comfyui(monkeypatch, tmp_path):
    for name in ("folder_paths", "comfy", "comfy.model_management", "comfy.model_patcher", "comfy.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    monkeypatch.setenv("NEARID_MODELS_DIR", str(tmp_path))
    assert comfy_env.model_folders() == [str(tmp_path)]
    assert comfy_env.model_files() == []
    assert comfy_env.load_device() == comfy_env.offload_device() == torch.device("cpu")
    assert comfy_env.auto_dtype(torch.device("cpu")) is None
    assert comfy_env.make_patcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu")) is None
    comfy_env.progress_bar(3).update(1)
    comfy_env.check_interrupt()
    comfy_env.register_model_folder()
    (tmp_path / "head.safetensors").write_bytes(b"")
    assert model_choices() == [DEFAULT_CHOICE, "head.safetensors"]


# --------------------------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def models_dir(fake_comfy, release_dir) -> Path:
    base = Path(fake_comfy.modules["folder_paths"].models_dir) / "nearid"
    shutil.copytree(release_dir, base / "nearid-tiny")
    (base / "heads").mkdir(parents=True)
    # its trunk lies in the model folders too, named relative to the head file's folder
    nearid_core.save_head_only(tiny_nearid_model(1, backbone="../nearid-tiny"), base / "heads" / "my_head.safetensors")
    (base / "notes.txt").write_text("ignored")
    return base


def test_model_dropdown_lists_directories_and_head_files(models_dir, fake_comfy):
    import folder_paths

    comfy_env.register_model_folder()
    assert folder_paths.get_folder_paths("nearid") == [str(models_dir)]
    choices = NearIDModelLoader.INPUT_TYPES()["required"]["model"][0]
    assert choices == [DEFAULT_CHOICE, "nearid-tiny", os.path.join("heads", "my_head.safetensors")]


def test_model_dropdown_defaults_to_a_local_model_when_there_is_one(fake_comfy, release_dir):
    """Offline users: a new loader node picks a local model when models/nearid holds one, the hub id otherwise."""
    model = NearIDModelLoader.INPUT_TYPES()["required"]["model"]
    assert model[0] == [DEFAULT_CHOICE] and model[1]["default"] == DEFAULT_CHOICE
    shutil.copytree(release_dir, Path(fake_comfy.modules["folder_paths"].models_dir) / "nearid" / "nearid-tiny")
    model = NearIDModelLoader.INPUT_TYPES()["required"]["model"]
    assert model[1]["default"] == "nearid-tiny" and model[1]["default"] in model[0]


@pytest.mark.parametrize("entry", ["nearid-tiny", os.path.join("heads", "my_head.safetensors")])
def test_loader_loads_dropdown_entries_under_comfy_management(models_dir, fake_comfy, entry):
    (out,) = NearIDModelLoader().load(entry, "auto", "float32", 4)
    assert out.name == str(models_dir / entry) and out.batch_size == 4
    assert out.patcher is not None and out.patcher.model.inner is out.scorer.model
    assert out.scorer.dtype == torch.float32
    result(NearIDScore().score(out, images(2), reference_images=images(1, seed=1)))
    patchers, kwargs = fake_comfy.loads[-1]
    assert patchers == [out.patcher] and kwargs.get("force_full_load") is True


def test_loader_device_cpu_skips_comfy_management(models_dir, fake_comfy):
    (out,) = NearIDModelLoader().load("nearid-tiny", "cpu", "float32", 16)
    assert out.patcher is None
    result(NearIDScore().score(out, images(1), reference_images=images(1, seed=1)))
    assert fake_comfy.loads == []


def test_loader_errors_list_searched_folders(models_dir, fake_comfy, tmp_path):
    extra = tmp_path / "extra_nearid"
    fake_comfy.modules["folder_paths"].add_model_folder_path("nearid", str(extra))
    with pytest.raises(FileNotFoundError) as err:
        NearIDModelLoader().load("gone-model", "auto", "auto", 16)
    assert str(models_dir) in str(err.value) and str(extra) in str(err.value)
    assert resolve_model(DEFAULT_CHOICE) == DEFAULT_CHOICE.removeprefix("hub:")
    assert resolve_model("nearid-tiny", hub_id="owner/other") == "owner/other"
    assert resolve_model(DEFAULT_CHOICE, hub_id="nearid-tiny") == str(models_dir / "nearid-tiny")
    with pytest.raises(ValueError, match="dtype"):
        NearIDModelLoader().load("nearid-tiny", "auto", "float64", 16)


# --------------------------------------------------------------------------------------------------------------------
# Loader on a shared server: paths confined to the model folders, symlink loops
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path, release_dir) -> Path:
    """A loadable model and a private file outside the model folders (`tmp_path/models/nearid`)."""
    base = tmp_path / "outside"
    shutil.copytree(release_dir, base / "x")
    (base / "x" / "id_rsa").write_text("private")
    (base / "private_head.safetensors").write_bytes(b"")
    return base


@pytest.mark.parametrize("text", ["Aleksandar/nearid-siglip2", "google/siglip2-so400m-patch14-384", "o/n.v2"])
def test_hub_ids_are_told_apart_from_paths(text):
    assert is_hub_id(text)


@pytest.mark.parametrize("text", ["../x", "/etc", "a/../../b", "~/x", "./x", "a/..", "a/b/c", "a\\b", "x", "", "-a/b"])
def test_paths_are_not_hub_ids(text):
    assert not is_hub_id(text)


@pytest.mark.parametrize("hub_id", ["../../outside/x", "nearid-tiny/../../../outside/x", "heads/../../../outside/x"])
def test_loader_refuses_relative_paths_leaving_the_model_folders(models_dir, fake_comfy, outside, hub_id):
    assert (models_dir / hub_id).exists()  # it would load: the refusal is about where it is, not whether it exists
    with pytest.raises(ModelPathError, match="outside the NearID model folders") as err:
        NearIDModelLoader().load(DEFAULT_CHOICE, "cpu", "float32", 2, hub_id=hub_id)
    assert comfy_env.ALLOW_ANY_PATH_ENV in str(err.value) and str(models_dir) in str(err.value)
    assert NearIDModelLoader.VALIDATE_INPUTS(hub_id=hub_id) == str(err.value)


def test_loader_refuses_absolute_paths_unless_the_owner_opts_in(models_dir, fake_comfy, outside, monkeypatch):
    target = str(outside / "x")
    for hub_id in (target, "~/x", "/etc", "/"):
        with pytest.raises(ModelPathError, match="outside the NearID model folders"):
            resolve_model(DEFAULT_CHOICE, hub_id)
    assert resolve_model(DEFAULT_CHOICE, str(models_dir / "nearid-tiny")) == str(models_dir / "nearid-tiny")
    monkeypatch.setenv(comfy_env.ALLOW_ANY_PATH_ENV, "1")
    (out,) = NearIDModelLoader().load(DEFAULT_CHOICE, "cpu", "float32", 2, hub_id=target)
    assert out.name == target
    assert resolve_model(DEFAULT_CHOICE, "../../outside/x") == target
    assert NearIDModelLoader.VALIDATE_INPUTS(hub_id=target) is True
    monkeypatch.setenv(comfy_env.ALLOW_ANY_PATH_ENV, "0")
    assert isinstance(NearIDModelLoader.VALIDATE_INPUTS(hub_id=target), str)


def test_symlink_leaving_the_model_folder_is_refused_and_not_listed(models_dir, fake_comfy, outside, monkeypatch):
    (models_dir / "escape").symlink_to(outside / "x", target_is_directory=True)
    (models_dir / "heads" / "linked.safetensors").symlink_to(outside / "private_head.safetensors")
    assert model_choices() == [DEFAULT_CHOICE, "nearid-tiny", os.path.join("heads", "my_head.safetensors")]
    for entry in ("escape", os.path.join("heads", "linked.safetensors")):
        with pytest.raises(ModelPathError, match="symlinks resolved"):
            NearIDModelLoader().load(entry, "cpu", "float32", 2)
    monkeypatch.setenv(comfy_env.ALLOW_ANY_PATH_ENV, "1")
    assert "escape" in model_choices()
    (out,) = NearIDModelLoader().load("escape", "cpu", "float32", 2)
    assert out.name == str(models_dir / "escape")


@pytest.mark.parametrize("trunk", ["outside", "missing", "/etc/passwd_dir", "../../outside/x"])
def test_head_only_file_naming_a_trunk_outside_the_model_folders_is_refused(models_dir, fake_comfy, outside,
                                                                              monkeypatch, trunk):
    """Regression: a head-only file in models/nearid/ could load its trunk from anywhere, and errors told outside
    paths ("Checkpoint path '/etc/passwd_dir' does not exist")."""
    named = {"outside": str(outside / "x"), "missing": str(outside / "gone")}.get(trunk, trunk)
    head = models_dir / "heads" / "evil.safetensors"
    nearid_core.save_head_only(tiny_nearid_model(1, backbone=named), head)
    entry = os.path.join("heads", "evil.safetensors")
    with pytest.raises(CheckpointError, match="outside the allowed model folders") as err:
        NearIDModelLoader().load(entry, "cpu", "float32", 2)
    message = str(err.value)
    assert entry in message and named not in message and str(outside) not in message and "passwd" not in message
    if trunk == "outside":
        monkeypatch.setenv(comfy_env.ALLOW_ANY_PATH_ENV, "1")
        (out,) = NearIDModelLoader().load(entry, "cpu", "float32", 2)
        assert out.name == str(head)


def test_loader_errors_list_only_model_files_inside_the_folders(models_dir, fake_comfy, outside):
    (models_dir / "ext").symlink_to(outside, target_is_directory=True)
    private = ("id_rsa", "private_head", "notes.txt")
    messages = []
    for hub_id in (str(outside / "x"), "../../outside/x", "ext", "gone-model", "gone/../gone"):
        with pytest.raises((ModelPathError, FileNotFoundError)) as err:
            resolve_model(DEFAULT_CHOICE, hub_id)
        messages.append(str(err.value))
    assert str(outside) not in messages[2]  # where the symlink points is not told
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("gone-model")
    messages.append(str(err.value))
    for message in messages:
        assert not any(p in message for p in private), message
    assert "nearid-tiny" in messages[-1] and os.path.join("heads", "my_head.safetensors") in messages[-1]


def test_hub_id_that_is_also_a_path_in_the_working_directory_is_refused(models_dir, fake_comfy, outside, monkeypatch):
    """nearid_core reads a local path of the hub id's name first: from ComfyUI's working directory, e.g. input/."""
    monkeypatch.chdir(outside.parent)
    with pytest.raises(ModelPathError, match="working directory"):
        resolve_model(DEFAULT_CHOICE, "outside/x")
    with pytest.raises(ModelPathError, match="hub id"):
        resolve_model("hub:../outside/x")
    assert resolve_model(DEFAULT_CHOICE, "owner/other") == "owner/other"
    assert resolve_model(DEFAULT_CHOICE, "models/nearid") == str(models_dir)  # relative to the cwd, but inside
    assert NearIDModelLoader.VALIDATE_INPUTS(hub_id="owner/other") is True
    assert NearIDModelLoader.VALIDATE_INPUTS(hub_id=None) is True  # linked input: checked when the node runs
    assert "nearid-tiny" in NearIDModelLoader.VALIDATE_INPUTS(hub_id="typo.safetensors")


def test_symlink_loops_give_one_dropdown_entry_per_model(models_dir, fake_comfy):
    expected = [DEFAULT_CHOICE, "nearid-tiny", os.path.join("heads", "my_head.safetensors")]
    (models_dir / "loop").symlink_to(models_dir, target_is_directory=True)
    (models_dir / "heads" / "up").symlink_to("..", target_is_directory=True)  # two loops: 2^40 paths if followed
    (models_dir / "nearid-tiny-alias").symlink_to("nearid-tiny", target_is_directory=True)
    (models_dir / "broken.safetensors").symlink_to("missing.safetensors")
    assert model_choices() == expected
    (out,) = NearIDModelLoader().load("nearid-tiny", "cpu", "float32", 2)
    assert out.name == str(models_dir / "nearid-tiny")


def test_dropdown_falls_back_outside_comfyui_with_a_symlink_loop(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "folder_paths", None)
    monkeypatch.setenv("NEARID_MODELS_DIR", str(tmp_path))
    (tmp_path / "head.safetensors").write_bytes(b"")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert model_choices() == [DEFAULT_CHOICE, "head.safetensors"]


# --------------------------------------------------------------------------------------------------------------------
# Embed + Score
# --------------------------------------------------------------------------------------------------------------------


def test_embed_matches_core_and_appends(handle, scorer):
    refs_a, refs_b = images(2, 64, 56, seed=1), images(1, 30, 30, seed=2)
    (emb,) = result(NearIDEmbed().embed(handle, refs_a))
    assert isinstance(emb, NearIDEmbedding) and emb.vectors.shape == (2, scorer.embed_dim)
    assert emb.vectors.device.type == "cpu" and emb.vectors.dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(emb.vectors, scorer.embed(refs_a), atol=1e-5, rtol=0)
    (both,) = result(NearIDEmbed().embed(handle, refs_b, embedding=emb))
    assert len(both) == 3 and torch.equal(both.vectors[:2], emb.vectors)
    torch.testing.assert_close(both.vectors.norm(dim=-1), torch.ones(3))


def test_score_matches_core_with_references_of_another_size(handle, scorer):
    refs, cands = images(2, 64, 56, seed=1), images(4)
    out = NearIDScore().score(handle, cands, "mean", reference_images=refs)
    scores, ranking, table = result(out)
    with torch.inference_mode():
        expected = scorer.score(refs, cands, reduce="mean")
    assert isinstance(scores, list) and len(scores) == 4 and all(isinstance(s, float) for s in scores)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=0)
    assert ranking == torch.sort(torch.tensor(scores), descending=True, stable=True).indices.tolist()
    assert out["ui"]["text"] == [table] and "100 x cosine" in table
    best = ranking[0]
    assert f"{100 * scores[best]:.2f}" in table.splitlines()[4]  # header (3 lines), column names, best first


@pytest.mark.parametrize("reduce", ["mean", "min", "max", "centroid"])
def test_score_from_embedding_equals_score_from_images(handle, reduce):
    refs, cands = images(3, 50, 50, seed=3), images(2)
    (emb,) = result(NearIDEmbed().embed(handle, refs))
    from_images = result(NearIDScore().score(handle, cands, reduce, reference_images=refs))[0]
    from_emb = result(NearIDScore().score(handle, cands, reduce, reference_embedding=emb))[0]
    torch.testing.assert_close(torch.tensor(from_emb), torch.tensor(from_images), atol=1e-5, rtol=0)
    assert all(-1 - 1e-5 <= s <= 1 + 1e-5 for s in from_emb)


def test_score_combines_embedding_and_images(handle):
    ref_a, ref_b, cands = images(1, 64, 64, seed=1), images(1, 36, 28, seed=2), images(2)
    (emb,) = result(NearIDEmbed().embed(handle, ref_a))
    combined = result(NearIDScore().score(handle, cands, "min", reference_images=ref_b, reference_embedding=emb))[0]
    a = result(NearIDScore().score(handle, cands, "min", reference_images=ref_a))[0]
    b = result(NearIDScore().score(handle, cands, "min", reference_images=ref_b))[0]
    expected = torch.minimum(torch.tensor(a), torch.tensor(b))
    torch.testing.assert_close(torch.tensor(combined), expected, atol=1e-5, rtol=0)


def test_score_single_image_and_empty_batch(handle):
    scores, ranking, _ = result(NearIDScore().score(handle, images(1), reference_images=images(1, seed=1)))
    assert len(scores) == 1 and ranking == [0]
    scores, ranking, table = result(NearIDScore().score(handle, images(0), reference_images=images(1, seed=1)))
    assert scores == [] and ranking == [] and "no images" in table


def test_score_identical_image_scores_one(handle):
    img = images(1)
    (score,), _, table = result(NearIDScore().score(handle, img, reference_images=img))
    assert score == pytest.approx(1.0, abs=1e-4) and "100.00" in table


def test_score_errors(handle, release_dir):
    with pytest.raises(ValueError, match="reference_images and/or reference_embedding"):
        NearIDScore().score(handle, images(2))
    with pytest.raises(ValueError, match="empty"):
        NearIDScore().score(handle, images(2), reference_images=images(0))
    nan = images(3)
    nan[1, 5, 5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[1\].*NaN"):
        NearIDScore().score(handle, nan, reference_images=images(1, seed=1))
    with pytest.raises(ValueError, match="reference_images"):
        NearIDScore().score(handle, images(1), reference_images=nan)
    with pytest.raises(ValueError, match="IMAGE tensor"):
        NearIDScore().score(handle, torch.rand(3, H, W), reference_images=images(1))
    other = NearIDModelHandle(scorer=NearIDScorer(tiny_nearid_model(2), TINY_PREPROCESS, "cpu", torch.float32),
                              name="/models/nearid/other-head")
    (emb,) = result(NearIDEmbed().embed(other, images(1)))
    with pytest.raises(ValueError, match="not comparable") as err:
        NearIDScore().score(handle, images(1), reference_embedding=emb)
    assert "'other-head'" in str(err.value) and "/models" not in str(err.value)


# --------------------------------------------------------------------------------------------------------------------
# Best-of-N
# --------------------------------------------------------------------------------------------------------------------


def test_best_of_n_selects_images_latents_and_masks(handle):
    cands, refs = images(5), images(2, 60, 60, seed=7)
    all_scores = result(NearIDScore().score(handle, cands, reference_images=refs))[0]
    samples = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 4, 5, 6).clone()
    latent = {"samples": samples, "batch_index": [10, 11, 12, 13, 14]}
    mask = torch.arange(5.0).view(5, 1, 1).expand(5, H, W).clone()
    out = NearIDBestOfN().select(handle, cands, 2, "mean", "NearID/best", reference_images=refs, latent=latent,
                                 mask=mask)
    imgs, indices, scores, lat, msk, prefix, table = result(out)
    order = sorted(range(5), key=lambda i: -all_scores[i])[:2]
    assert indices == order and imgs.shape == (2, H, W, 3)
    assert torch.equal(imgs, cands[order])
    assert scores == pytest.approx([all_scores[i] for i in order], abs=1e-6)
    assert lat["samples"].shape == (2, 4, 5, 6) and lat["samples"][:, 0, 0, 0].tolist() == [float(i) for i in order]
    assert lat["batch_index"] == [10 + i for i in order] and latent["samples"].shape[0] == 5  # input untouched
    assert msk[:, 0, 0].tolist() == [float(i) for i in order]
    assert prefix == f"NearID/best_{100 * scores[0]:.1f}"
    assert len(table.splitlines()) == 4 + 2


def test_best_of_n_clamps_top_k_and_handles_one_and_zero_images(handle):
    refs = images(1, 30, 50, seed=1)
    imgs, indices, scores, lat, msk, prefix, _ = result(NearIDBestOfN().select(handle, images(3), 99, "mean", "x",
                                                                              reference_images=refs))
    assert imgs.shape[0] == 3 and sorted(indices) == [0, 1, 2] and scores == sorted(scores, reverse=True)
    assert lat is None and msk.shape == (3, H, W) and not msk.any()
    imgs, indices, *_ = result(NearIDBestOfN().select(handle, images(1), 4, "mean", "x", reference_images=refs,
                                                      mask=torch.ones(H, W)))
    assert imgs.shape == (1, H, W, 3) and indices == [0]
    imgs, indices, scores, lat, msk, prefix, table = result(NearIDBestOfN().select(
        handle, images(0), 1, "mean", "x", reference_images=refs, latent={"samples": torch.zeros(0, 4, 5, 6)}))
    assert imgs.shape == (0, H, W, 3) and indices == [] and scores == [] and prefix == "x_none"
    assert lat["samples"].shape == (0, 4, 5, 6) and msk.shape == (0, H, W)


def test_best_of_n_errors(handle):
    refs = images(1, seed=1)
    with pytest.raises(ValueError, match="latent batch"):
        NearIDBestOfN().select(handle, images(3), 1, reference_images=refs, latent={"samples": torch.zeros(2, 4, 5, 6)})
    with pytest.raises(ValueError, match="mask batch"):
        NearIDBestOfN().select(handle, images(3), 1, reference_images=refs, mask=torch.zeros(2, H, W))
    bad = images(2)
    bad[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        NearIDBestOfN().select(handle, bad, 1, reference_images=refs)


def test_single_mask_is_repeated_for_every_kept_image(handle):
    mask = torch.rand(1, H, W)
    msk = result(NearIDBestOfN().select(handle, images(3), 2, reference_images=images(1, seed=1), mask=mask))[4]
    assert msk.shape == (2, H, W) and torch.equal(msk[0], mask[0]) and torch.equal(msk[1], mask[0])


# --------------------------------------------------------------------------------------------------------------------
# Threshold filter
# --------------------------------------------------------------------------------------------------------------------


def test_threshold_splits_in_batch_order(handle):
    cands, refs = images(4), images(2, 64, 40, seed=9)
    scores = result(NearIDScore().score(handle, cands, reference_images=refs))[0]
    threshold = sorted(scores)[1] + 1e-6  # two accepted, two rejected
    acc, rej, n_acc, n_rej, out_scores, table = result(
        NearIDThresholdFilter().split(handle, cands, threshold, "mean", reference_images=refs))
    keep = [i for i in range(4) if scores[i] >= threshold]
    assert n_acc == 2 and n_rej == 2 and torch.equal(acc, cands[keep])
    assert torch.equal(rej, cands[[i for i in range(4) if i not in keep]])
    assert out_scores == pytest.approx(scores, abs=1e-6)
    assert table.count("accepted") >= 2 and "threshold" in table


def test_threshold_with_nothing_accepted_returns_empty_batch(handle):
    cands = images(3)
    acc, rej, n_acc, n_rej, _, table = result(
        NearIDThresholdFilter().split(handle, cands, 1.0, reference_images=images(1, seed=1)))
    assert acc.shape == (0, H, W, 3) and acc.dtype == torch.float32 and n_acc == 0
    assert torch.equal(rej, cands) and n_rej == 3
    acc, rej, n_acc, n_rej, scores, _ = result(
        NearIDThresholdFilter().split(handle, images(0), 0.0, reference_images=images(1, seed=1)))
    assert acc.shape == rej.shape == (0, H, W, 3) and (n_acc, n_rej) == (0, 0) and scores == []


def save_image(images) -> str:
    """What ComfyUI's SaveImage / PreviewImage (nodes.py, 0.3.64) do with their input: an ExecutionBlocker input skips
    the node (execution.py); otherwise they read images[0] for the size, which raises IndexError on an empty batch."""
    if isinstance(images, ExecutionBlocker):
        return "skipped" if images.message is None else "error dialog"
    images[0].shape
    return f"saved {images.shape[0]}"


@pytest.mark.parametrize("on_empty", [*ON_EMPTY, *LEGACY_ON_EMPTY])
def test_threshold_skips_downstream_of_an_empty_side_in_comfyui(handle, fake_comfy, on_empty, caplog):
    """Every on_empty value, current or from a saved workflow, leaves a prompt that Save Image cannot fail."""
    cands, refs = images(2), images(1, seed=1)
    acc, rej, n_acc, n_rej, _, table = result(
        NearIDThresholdFilter().split(handle, cands, 1.0, on_empty=on_empty, reference_images=refs))
    assert isinstance(acc, ExecutionBlocker) and acc.message is None  # ComfyUI silently skips Save Image there
    assert torch.equal(rej, cands) and (n_acc, n_rej) == (0, 2)
    assert (save_image(acc), save_image(rej)) == ("skipped", "saved 2")
    acc, rej, *_ = result(NearIDThresholdFilter().split(handle, cands, -1.0, on_empty=on_empty, reference_images=refs))
    assert torch.equal(acc, cands) and isinstance(rej, ExecutionBlocker)
    assert (save_image(acc), save_image(rej)) == ("saved 2", "skipped")
    retired = on_empty in LEGACY_ON_EMPTY
    assert ("retired" in table) == retired and ("retired" in caplog.text) == retired
    assert NearIDThresholdFilter.VALIDATE_INPUTS(on_empty=on_empty) is True


def test_threshold_refuses_unknown_on_empty(handle):
    assert NearIDThresholdFilter.VALIDATE_INPUTS(on_empty=None) is True  # linked input: checked when it runs
    assert "skip downstream" in NearIDThresholdFilter.VALIDATE_INPUTS(on_empty="drop")
    with pytest.raises(ValueError, match="on_empty"):
        NearIDThresholdFilter().split(handle, images(2), 1.0, on_empty="drop", reference_images=images(1, seed=1))
    with pytest.raises(IndexError):  # why "empty batch" was retired
        save_image(images(0))


def test_threshold_rejects_images_with_nan_instead_of_raising(handle):
    cands = images(3)
    cands[2, 0, 0, 1] = float("nan")
    acc, rej, n_acc, n_rej, scores, table = result(
        NearIDThresholdFilter().split(handle, cands, -1.0, reference_images=images(1, seed=1)))
    assert n_acc == 2 and n_rej == 1 and torch.equal(acc, cands[:2]) and math.isnan(scores[2])
    assert torch.isnan(rej).any() and "invalid" in table
    with pytest.raises(ValueError, match="reference_images"):  # broken references are still an error
        NearIDThresholdFilter().split(handle, images(1), 0.0, reference_images=cands)


# --------------------------------------------------------------------------------------------------------------------
# Heatmap
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("colormap", ["inferno", "jet", "gray"])
def test_heatmap_mask_and_overlay(handle, scorer, colormap):
    imgs = images(4, 37, 53)
    attention, overlay = NearIDAttentionHeatmap().heatmap(handle, imgs, 0.6, colormap)
    assert attention.shape == (4, 37, 53) and overlay.shape == (4, 37, 53, 3)
    assert attention.dtype == overlay.dtype == torch.float32
    assert 0 <= attention.min() and attention.max() <= 1 and 0 <= overlay.min() and overlay.max() <= 1
    with torch.inference_mode():
        torch.testing.assert_close(attention, scorer.attention_maps(imgs, size=(37, 53)), atol=1e-5, rtol=0)
    _, unchanged = NearIDAttentionHeatmap().heatmap(handle, imgs[:1], 0.0, colormap)
    torch.testing.assert_close(unchanged, imgs[:1])


def test_heatmap_empty_single_and_nan(handle):
    attention, overlay = NearIDAttentionHeatmap().heatmap(handle, images(0), 0.5, "inferno")
    assert attention.shape == (0, H, W) and overlay.shape == (0, H, W, 3)
    attention, overlay = NearIDAttentionHeatmap().heatmap(handle, images(1), 1.0, "gray")
    torch.testing.assert_close(overlay[0, :, :, 0], attention[0])  # gray at full opacity is the map itself
    bad = images(2)
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        NearIDAttentionHeatmap().heatmap(handle, bad, 0.5, "inferno")


# --------------------------------------------------------------------------------------------------------------------
# Progress and Cancel
# --------------------------------------------------------------------------------------------------------------------


def test_progress_counts_every_embedded_image(handle, fake_comfy):
    handle.cache.clear()
    result(NearIDScore().score(handle, images(7), reference_images=images(2, seed=1)))  # batch_size 3
    total, updates = fake_comfy.progress[-1]
    assert total == 9 and sum(updates) == 9 and updates == [2, 3, 3, 1]
    NearIDAttentionHeatmap().heatmap(handle, images(4, seed=5), 0.5, "inferno")
    assert fake_comfy.progress[-1] == (4, [3, 1])
    NearIDAttentionHeatmap().heatmap(handle, images(5), 0.5, "inferno")  # all 5 seen by the Score node: done at once
    assert fake_comfy.progress[-1] == (5, [5])


def test_cancel_stops_between_batches(handle, fake_comfy):
    handle.cache.clear()
    fake_comfy.interrupt_after = 1
    with pytest.raises(Interrupted):
        NearIDScore().score(handle, images(7), reference_images=images(1, seed=1))
    assert fake_comfy.progress[-1][1] == [1]  # references done, candidates interrupted before the first batch


# --------------------------------------------------------------------------------------------------------------------
# One trunk pass per image per prompt (trunk_cache)
# --------------------------------------------------------------------------------------------------------------------


class TrunkCounter:
    """Counts images through the SigLIP trunk: its patch embedding runs once per image in every trunk pass (embed,
    score and attention paths alike)."""

    def __init__(self, scorer: NearIDScorer) -> None:
        self.images = 0
        self._hook = scorer.model._tower.embeddings.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.images += int(output.shape[0])

    def close(self) -> None:
        self._hook.remove()


def load_api(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def shared_model_prompt() -> dict:
    """score_and_rank.json plus threshold_split.json on the same model loader: one model feeding Embed, Score,
    Best-of-N, Heatmap and Threshold nodes in one prompt (threshold_split's node ids get a 't' prefix)."""
    prompt = load_api("score_and_rank")
    loader = next(k for k, n in prompt.items() if n["class_type"] == "NearIDModelLoader")
    split = load_api("threshold_split")
    split_loader = next(k for k, n in split.items() if n["class_type"] == "NearIDModelLoader")
    renamed = {k: loader if k == split_loader else f"t{k}" for k in split}
    for k, node in split.items():
        if k != split_loader:
            inputs = {name: [renamed[v[0]], v[1]] if isinstance(v, list) else v for name, v in node["inputs"].items()}
            prompt[renamed[k]] = dict(node, inputs=inputs)
    return prompt


def run_prompt(prompt: dict, handle: NearIDModelHandle) -> dict[str, tuple]:
    """Execute an API-format prompt as ComfyUI would (each node once, inputs first), with `handle` as every loader's
    output, a synthetic picture per LoadImage file name, and `save_image` for the core output nodes."""
    names = sorted({n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"})
    pictures = {name: images(1, seed=100 + i) for i, name in enumerate(names)}
    outputs: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id not in outputs:
            node = prompt[node_id]
            inputs = {k: run(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            kind = node["class_type"]
            if any(isinstance(v, ExecutionBlocker) for v in inputs.values()):
                out = (ExecutionBlocker(None),) * 8  # ComfyUI skips the node and blocks its users
            elif kind == "NearIDModelLoader":
                out = (handle,)
            elif kind == "LoadImage":
                out = (pictures[inputs["image"]], torch.zeros(1, H, W))
            elif kind == "ImageBatch":
                out = (torch.cat([inputs["image1"], inputs["image2"]]),)
            elif kind in ("SaveImage", "PreviewImage"):
                out = (save_image(inputs["images"]),)
            elif kind == "PreviewAny":
                out = (inputs["source"],)
            else:
                cls = nearid_nodes.NODE_CLASS_MAPPINGS[kind]
                raw = getattr(cls(), cls.FUNCTION)(**inputs)
                out = raw["result"] if isinstance(raw, dict) else raw
            outputs[node_id] = out
        return outputs[node_id]

    for node_id in prompt:
        run(node_id)
    return outputs


def test_each_image_passes_the_trunk_once_across_the_four_nodes(release_dir, fake_comfy):
    prompt = shared_model_prompt()
    kinds = {n["class_type"] for n in prompt.values()}
    assert {"NearIDEmbed", "NearIDScore", "NearIDBestOfN", "NearIDAttentionHeatmap", "NearIDThresholdFilter"} <= kinds

    uncached = load_handle(release_dir)
    uncached.cache.max_bytes = 0  # nothing is kept: every node runs the trunk itself, as before the cache
    counter = TrunkCounter(uncached.scorer)
    before = run_prompt(prompt, uncached)
    counter.close()
    # Embed 1 + Embed 1 + Score 3 + Best-of-N 3 + Heatmap 3 (score_and_rank) + Embed 1 + Threshold 3 (threshold_split)
    assert counter.images == 15

    cached = load_handle(release_dir)
    counter = TrunkCounter(cached.scorer)
    after = run_prompt(prompt, cached)
    assert counter.images == 6  # 3 distinct references + 3 candidates, once each
    again = run_prompt(prompt, cached)  # the next prompt: same pixels (new tensors), nothing runs the trunk
    assert counter.images == 6 and cached.cache.hits > 0
    counter.close()
    for outputs in (after, again):
        for node_id, out in before.items():
            for value, expected in zip(out, outputs[node_id]):
                if isinstance(expected, torch.Tensor):
                    torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
                elif isinstance(expected, list) and expected and isinstance(expected[0], float):
                    assert value == pytest.approx(expected, abs=1e-6)
                elif not isinstance(expected, (NearIDModelHandle, NearIDEmbedding, ExecutionBlocker, dict)):
                    assert value == expected, node_id


def test_cache_tells_images_apart_and_never_hands_out_its_own_tensors(release_dir):
    handle = load_handle(release_dir)
    pbar = comfy_env.progress_bar(0)
    batch = images(3)
    emb, grids = trunk_cache.encode(handle, batch, pbar)
    counter = TrunkCounter(handle.scorer)
    changed = batch.clone()
    changed[1, 0, 0, 0] += 1 / 255  # one pixel level
    emb2, _ = trunk_cache.encode(handle, changed, pbar)
    assert counter.images == 1 and torch.equal(emb2[[0, 2]], emb[[0, 2]]) and not torch.equal(emb2[1], emb[1])
    emb3, _ = trunk_cache.encode(handle, batch[:2].half().float(), pbar)  # other values after a round trip
    assert counter.images == 3
    trunk_cache.encode(handle, batch[:1].double(), pbar)  # same values, other dtype: another key
    assert counter.images == 4
    twice, _ = trunk_cache.encode(handle, torch.cat([images(1, seed=9)] * 3), pbar)  # duplicates in one batch
    assert counter.images == 5 and torch.equal(twice[0], twice[2])
    emb.zero_()
    grids.zero_()  # what a caller does with its outputs does not reach the cache
    again, grids2 = trunk_cache.encode(handle, batch, pbar)
    assert counter.images == 5 and again.norm(dim=-1).min() > 0.99 and grids2.abs().sum() > 0
    counter.close()
    with torch.inference_mode():
        torch.testing.assert_close(again, handle.scorer.embed(batch, layout="channels_last").cpu(), atol=1e-5, rtol=0)


def test_cache_is_bounded_by_bytes_least_recently_used_first():
    cache = trunk_cache.TrunkCache(max_bytes=3 * (8 + 4) * 4)  # three entries of 8 + 4 floats
    for i in range(5):
        cache.put(("m", i), torch.full((8,), float(i)), torch.zeros(2, 2))
        if i == 2:
            assert cache.get(("m", 0)) is not None  # touching 0 makes 1 the oldest
    assert len(cache) == 3 and cache.nbytes <= cache.max_bytes
    assert cache.get(("m", 1)) is None and cache.get(("m", 2)) is None
    assert cache.get(("m", 0))[0][0] == 0 and cache.get(("m", 4))[0][0] == 4
    cache.put(("m", "huge"), torch.zeros(1000), torch.zeros(1))  # larger than the whole budget: not kept
    assert cache.get(("m", "huge")) is None and cache.nbytes <= cache.max_bytes
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_core_embed_and_attend_equals_embed_and_attention_maps(scorer):
    imgs = images(4, 37, 53)
    with torch.inference_mode():
        emb, grids = scorer.embed_and_attend(imgs, batch_size=3, layout="channels_last")
        torch.testing.assert_close(emb, scorer.embed(imgs, layout="channels_last"), atol=1e-6, rtol=0)
        maps = scorer.attention_to_maps(grids, [(37, 53)] * 4)
        torch.testing.assert_close(maps, scorer.attention_maps(imgs, size=(37, 53), layout="channels_last"))
        mixed = scorer.attention_to_maps(grids[:2], [(20, 30), (37, 53)])
        assert [tuple(m.shape) for m in mixed] == [(20, 30), (37, 53)]
        empty_emb, empty_grids = scorer.embed_and_attend([])
    assert emb.shape == (4, scorer.embed_dim) and grids.shape == (4, 4, 4) and grids.device.type == "cpu"
    assert empty_emb.shape == (0, scorer.embed_dim) and empty_grids.shape == (0, 4, 4)


# --------------------------------------------------------------------------------------------------------------------
# Model identity by content
# --------------------------------------------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights_not_the_path(release_dir, tmp_path, handle):
    link = tmp_path / "linked-nearid"
    link.symlink_to(release_dir, target_is_directory=True)
    copy = tmp_path / "copied"
    shutil.copytree(release_dir, copy)
    via_link, via_copy, in_bf16 = load_handle(link), load_handle(copy), load_handle(release_dir, dtype="bfloat16")
    assert handle.fingerprint == via_link.fingerprint == via_copy.fingerprint == in_bf16.fingerprint
    assert len(handle.fingerprint) == 16 and handle.name != via_link.name
    assert via_link.display_name == "linked-nearid" and via_link.label == f"linked-nearid [{handle.fingerprint[:8]}]"
    other_weights = NearIDScorer(tiny_nearid_model(2), TINY_PREPROCESS, "cpu", torch.float32)
    other_preprocess = NearIDScorer(handle.scorer.model, type(TINY_PREPROCESS)(size=(56, 56), resample="bicubic"),
                                    "cpu", torch.float32)
    assert len({handle.fingerprint, other_weights.fingerprint(), other_preprocess.fingerprint()}) == 3

    # an embedding made through the symlink is accepted by the model loaded from the real path, and the UI is short
    out = NearIDEmbed().embed(via_link, images(2, seed=4))
    (emb,) = result(out)
    assert emb.model_id == handle.fingerprint and emb.model_name == "linked-nearid"
    assert str(tmp_path) not in out["ui"]["text"][0] and "linked-nearid [" in out["ui"]["text"][0]
    scores = result(NearIDScore().score(handle, images(2), reference_embedding=emb))[0]
    direct = result(NearIDScore().score(handle, images(2), reference_images=images(2, seed=4)))[0]
    assert scores == pytest.approx(direct, abs=1e-6)


@pytest.mark.parametrize("source, shown", [
    ("Aleksandar/nearid-siglip2", "Aleksandar/nearid-siglip2"), ("/srv/comfy/models/nearid/nearid-tiny", "nearid-tiny"),
    ("/srv/comfy/models/nearid/heads/my_head.safetensors", "my_head"), ("heads/my_head.safetensors", "heads/my_head"),
    ("/srv/comfy/models/nearid/nearid-tiny/", "nearid-tiny"), ("nearid-tiny", "nearid-tiny"),
])
def test_short_display_names(source, shown):
    assert short_name(source) == shown


def test_loader_shows_the_dropdown_entry(models_dir, fake_comfy):
    (out,) = NearIDModelLoader().load(os.path.join("heads", "my_head.safetensors"), "cpu", "float32", 2)
    assert out.display_name == os.path.join("heads", "my_head") and str(models_dir) not in out.label
    assert str(models_dir) not in repr(out)
