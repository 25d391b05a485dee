"""`nearid embed` at scale: file lists, Hugging Face datasets, resumable shard folders, process assignment, loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nearid_core import NearIDScorer, load_embeddings
from nearid_core.cli import main
from nearid_core.embed_shards import MANIFEST, shard_name, shards_for_process


def _embed(*argv: str, model: Path) -> int:
    return main(["embed", *argv, "--model", str(model), "--dtype", "fp32"])


@pytest.fixture(scope="module")
def reference(release_dir, image_files, tmp_path_factory) -> tuple[torch.Tensor, list[str]]:
    """The unsharded run's embeddings and sources of `image_files` (4 images)."""
    out = tmp_path_factory.mktemp("single") / "emb.safetensors"
    assert _embed(*map(str, image_files), "-o", str(out), model=release_dir) == 0
    return load_embeddings(out)


def _count_embed_calls(monkeypatch) -> list[list[str]]:
    """The sources of every `NearIDScorer.embed_files` call from now on, one list a call."""
    calls: list[list[str]] = []
    original = NearIDScorer.embed_files

    def counting(self, paths, *args, **kwargs):
        calls.append([str(p) for p in paths])
        return original(self, paths, *args, **kwargs)

    monkeypatch.setattr(NearIDScorer, "embed_files", counting)
    return calls


@pytest.fixture
def images(image_files) -> list[Path]:
    assert len(image_files) >= 3
    return image_files


def test_process_assignment_is_round_robin():
    assert shards_for_process(7, 0, 1) == list(range(7))
    assert shards_for_process(7, 0, 3) == [0, 3, 6]
    assert shards_for_process(7, 2, 3) == [2, 5]
    assert shards_for_process(2, 3, 4) == []
    every = sorted(k for rank in range(4) for k in shards_for_process(10, rank, 4))
    assert every == list(range(10))
    with pytest.raises(ValueError):
        shards_for_process(3, 2, 2)


def test_file_list_resolves_relative_paths_against_its_folder(release_dir, images, reference, tmp_path, capsys):
    listing = images[0].parent / "list.txt"
    listing.write_text("# images\n" + "\n".join(p.name for p in images) + "\n\n")
    out = tmp_path / "emb.safetensors"
    assert _embed("--file-list", str(listing), "-o", str(out), model=release_dir) == 0
    embeddings, sources = load_embeddings(out)
    assert sources == reference[1]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)


def test_shards_equal_the_unsharded_run_and_round_trip(release_dir, images, reference, tmp_path):
    folder = tmp_path / "shards"
    assert _embed(*map(str, images), "--shard-size", "2", "-o", str(folder), model=release_dir) == 0
    n_shards = -(-len(images) // 2)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, *(shard_name(k) for k in range(n_shards))]
    manifest = json.loads((folder / MANIFEST).read_text())
    scorer = NearIDScorer.from_pretrained(release_dir, dtype=torch.float32)
    assert manifest["complete"] and manifest["rows"] == manifest["inputs"] == len(images)
    assert manifest["fingerprint"] == scorer.fingerprint() and manifest["shard_size"] == 2
    embeddings, sources = load_embeddings(folder)
    assert sources == reference[1]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)
    first, first_sources = load_embeddings(folder / shard_name(0))
    assert first_sources == reference[1][:2] and first.shape == (2, reference[0].shape[1])


def test_rerun_recomputes_only_a_deleted_shard(release_dir, images, reference, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "shards"
    argv = [*map(str, images), "--shard-size", "1", "-o", str(folder)]
    assert _embed(*argv, model=release_dir) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    (folder / shard_name(1)).unlink()
    calls = _count_embed_calls(monkeypatch)
    capsys.readouterr()
    assert _embed(*argv, model=release_dir) == 0
    assert calls == [reference[1][1:2]]
    assert f"wrote 1 shard(s), {len(images) - 1} already complete" in capsys.readouterr().out
    for name, mtime in mtimes.items():
        if name != shard_name(1):
            assert (folder / name).stat().st_mtime_ns == mtime
    embeddings, sources = load_embeddings(folder)
    assert sources == reference[1]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)
    calls.clear()
    assert _embed(*argv, model=release_dir) == 0 and calls == []  # complete: nothing to do


@pytest.mark.parametrize("change", ["inputs", "shard size", "model"])
def test_mismatched_rerun_is_refused(change, release_dir, siglip_vision_dir, images, tmp_path, capsys):
    folder = tmp_path / "shards"
    assert _embed(*map(str, images), "--shard-size", "2", "-o", str(folder), model=release_dir) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv, model = [*map(str, images), "--shard-size", "2", "-o", str(folder)], release_dir
    if change == "inputs":
        argv[0], argv[1] = argv[1], argv[0]
    elif change == "shard size":
        argv[argv.index("--shard-size") + 1] = "3"
    else:
        model = siglip_vision_dir
    capsys.readouterr()
    assert _embed(*argv, model=model) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "another --output folder" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_saved_dataset_embeds_like_its_files(release_dir, images, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [Image.open(p) for p in images], "label": list(range(len(images)))},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.Value("int64")})).save_to_disk(saved)
    single = tmp_path / "emb.safetensors"
    assert _embed("--dataset", str(saved), "-o", str(single), model=release_dir) == 0
    embeddings, sources = load_embeddings(single)
    assert sources == [f"{saved}:train:{i}" for i in range(len(images))]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)
    folder = tmp_path / "shards"
    assert _embed("--dataset", str(saved), "--shard-size", "2", "-o", str(folder), model=release_dir) == 0
    sharded, shard_sources = load_embeddings(folder)
    assert shard_sources == sources
    torch.testing.assert_close(sharded, reference[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["offline hub name", "missing column", "dataset and files", "nothing",
                                  "missing file list", "output is a file"])
def test_dataset_mistakes_exit_2_with_one_message(case, release_dir, images, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"label": [1, 2]}).save_to_disk(saved)
    argv = {"offline hub name": ["--dataset", "someone/not-cached"],
            "missing column": ["--dataset", str(saved)],
            "dataset and files": [str(images[0]), "--dataset", str(saved)],
            "nothing": [],
            "missing file list": ["--file-list", str(tmp_path / "none.txt")],
            "output is a file": [str(images[0]), "--shard-size", "2"]}[case]
    if case == "offline hub name":
        import huggingface_hub.constants as hub_constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    output = tmp_path / "e.safetensors"
    if case == "output is a file":
        output.write_bytes(b"x")
    try:
        rc = _embed(*argv, "-o", str(output), model=release_dir)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and "Traceback" not in err
    expected = {"offline hub name": "someone/not-cached", "missing column": "no column 'image'",
                "dataset and files": "not both", "nothing": "nothing to embed",
                "missing file list": "cannot read --file-list", "output is a file": "names a folder"}[case]
    assert expected in err
    assert output.exists() == (case == "output is a file")


def test_unfinished_folder_is_not_loaded(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"complete": False, "shards": 1}))
    with pytest.raises(ValueError, match="rerun the same"):
        load_embeddings(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path / "nothing-here")


def test_two_processes_share_the_shards(release_dir, images, reference, tmp_path):
    """Two CPU processes (torchrun, as `accelerate launch` starts them on GPUs; accelerate's own launcher runs one
    process on a single CPU machine): each writes its shards, the main one the manifest."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    pytest.importorskip("accelerate")
    folder = tmp_path / "shards"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "nearid_core.cli", "embed", *map(str, images), "--shard-size", "1", "-o",
                          str(folder), "--model", str(release_dir), "--dtype", "fp32", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "process 0/2: wrote 2 shard(s)" in run.stdout and "process 1/2: wrote 2 shard(s)" in run.stdout
    for k in range(len(images)):
        with safe_open(str(folder / shard_name(k)), "pt") as f:
            assert f.metadata()["shard"] == str(k)
    embeddings, sources = load_embeddings(folder)
    assert sources == reference[1]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)


@pytest.fixture
def image_folder(images, tmp_path) -> Path:
    """A local data folder of the test images, which `datasets.load_dataset` reads as an imagefolder."""
    import shutil

    folder = tmp_path / "data"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("workers", ["0", "2"])
def test_streamed_dataset_embeds_like_its_files(workers, release_dir, image_folder, reference, tmp_path):
    pytest.importorskip("datasets")
    out = tmp_path / "emb.safetensors"
    assert _embed("--dataset", str(image_folder), "--streaming", "--workers", workers, "-o", str(out),
                  model=release_dir) == 0
    embeddings, sources = load_embeddings(out)
    assert sources == [f"{image_folder}:train:{i}" for i in range(len(reference[1]))]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)


def test_streamed_shards_resume_after_the_last_complete_shard(release_dir, image_folder, reference, tmp_path,
                                                              monkeypatch, capsys):
    pytest.importorskip("datasets")
    folder = tmp_path / "shards"
    argv = ["--dataset", str(image_folder), "--streaming", "--shard-size", "3", "-o", str(folder)]
    assert _embed(*argv, model=release_dir) == 0
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["complete"] and manifest["shard_rows"] == [3, 1] and manifest["inputs"] is None
    (folder / shard_name(1)).unlink()  # as if the run had been killed before its last shard
    (folder / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    calls = _count_embed_calls(monkeypatch)
    capsys.readouterr()
    assert _embed(*argv, model=release_dir) == 0
    assert calls == [[f"{image_folder}:train:3"]]
    assert "wrote 1 shard(s), 1 already complete" in capsys.readouterr().out
    embeddings, sources = load_embeddings(folder)
    assert sources == [f"{image_folder}:train:{i}" for i in range(len(reference[1]))]
    torch.testing.assert_close(embeddings, reference[0], atol=1e-6, rtol=0)
    calls.clear()
    assert _embed(*argv, model=release_dir) == 0 and calls == []  # complete: nothing to do
    shards = tmp_path / "files"
    assert _embed(str(image_folder), "--shard-size", "3", "-o", str(shards), model=release_dir) == 0
    assert _embed(*argv[:-1], str(shards), model=release_dir) == 2  # a folder of another run is refused


@pytest.mark.parametrize("case", ["no dataset", "saved dataset", "several processes"])
def test_streaming_mistakes_exit_2_with_one_message(case, release_dir, images, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"label": [1, 2]}).save_to_disk(saved)
    argv = {"no dataset": [str(images[0])], "saved dataset": ["--dataset", str(saved)],
            "several processes": ["--dataset", str(saved), "--shard-size", "2"]}[case]
    if case == "several processes":
        monkeypatch.setenv("WORLD_SIZE", "2")
    output = tmp_path / ("out" if case == "several processes" else "out.safetensors")
    try:
        rc = _embed(*argv, "--streaming", "-o", str(output), model=release_dir)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert {"no dataset": "give --dataset", "saved dataset": "drop --streaming",
            "several processes": "one process"}[case] in err
