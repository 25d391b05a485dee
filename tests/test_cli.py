"""`nearid score` / `nearid embed`, called in-process through main(argv)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nearid_core import NearIDScorer
from nearid_core.cli import UsageError, expand_images, main, parse_args, sidecar_path


@pytest.fixture(scope="module")
def scorer(release_dir):
    return NearIDScorer.from_pretrained(release_dir, dtype=torch.float32)


def test_score_json_is_ranked_and_matches_the_api(release_dir, image_files, scorer, capsys):
    rc = main(["score", "--ref", str(image_files[0]), *map(str, image_files[1:]), "--model", str(release_dir),
               "--dtype", "fp32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    expected = scorer.score(str(image_files[0]), [str(p) for p in image_files[1:]])
    by_file = {r["file"]: r["score"] for r in out["results"]}
    for path, value in zip(image_files[1:], expected.tolist()):
        assert by_file[str(path)] == pytest.approx(value, abs=1e-5)
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert out["results"][0]["score_100"] == pytest.approx(100 * scores[0], abs=0.01)


def test_score_several_references_directory_and_top_k(release_dir, image_files, scorer, capsys):
    directory = image_files[0].parent
    rc = main(["score", "--ref", str(image_files[0]), "--ref", str(image_files[1]), str(directory),
               "--model", str(release_dir), "--dtype", "fp32", "--reduce", "min", "--top-k", "2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = lines[3:]
    assert len(rows) == 2
    refs = [str(image_files[0]), str(image_files[1])]
    best = scorer.rank(refs, [str(p) for p in sorted(directory.iterdir())], top_k=1, reduce="min")
    assert rows[0].split()[-1] == str(sorted(directory.iterdir())[int(best[0][0])])
    assert float(rows[0].split()[1]) == pytest.approx(float(best[1][0]), abs=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_embed_writes_embeddings(release_dir, image_files, scorer, tmp_path, suffix, capsys):
    out = tmp_path / f"emb{suffix}"
    assert main(["embed", *map(str, image_files), "-o", str(out), "--model", str(release_dir), "--dtype", "fp32"]) == 0
    if suffix == ".npy":
        emb = torch.from_numpy(np.load(out))
    else:
        with safe_open(str(out), "pt") as f:
            emb = f.get_tensor("embeddings")
            assert json.loads(f.metadata()["files"]) == [str(p) for p in image_files]
    torch.testing.assert_close(emb, scorer.embed([str(p) for p in image_files]), atol=1e-5, rtol=0)


def test_offline_hub_id_ends_in_a_clear_message(monkeypatch, tmp_path, image_files, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    rc = main(["score", "--ref", str(image_files[0]), str(image_files[1]), "--model", "someone/not-cached"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "someone/not-cached" in err and "hub-cache" in err and "--model DIR" in err


def test_unreadable_image_names_the_file(release_dir, image_files, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(["score", "--ref", str(image_files[0]), str(bad), "--model", str(release_dir)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        expand_images([str(tmp_path / "nope.png")])
    with pytest.raises(UsageError, match="no image files"):
        expand_images([str(tmp_path)])


@pytest.mark.parametrize("argv", [
    ["embed", "a.png", "-o", "x.txt"],
    ["score", "--ref", "a.png", "b.png", "--batch-size", "0"],
    ["score", "b.png"],
    ["score", "--ref", "a.png", "b.png", "--top-k", "0"],
])
def test_bad_flags_exit_before_loading(argv):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


# ----------------------------------------------------------------------------------------------------------------------
# The contract: every user mistake is exit 2 and one message, no traceback; outputs are atomic and say which row is which


def _bad_invocations(tmp_path, image_files, release_dir):
    img, model = str(image_files[0]), str(release_dir)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    return {
        "output is a directory": ["embed", img, "-o", str(tmp_path)],
        "output under a file": ["embed", img, "-o", str(a_file / "x.npy")],
        "output suffix": ["embed", img, "-o", str(tmp_path / "x.txt")],
        "missing image": ["score", "--ref", img, str(tmp_path / "nope.png")],
        "empty directory": ["embed", str(empty), "-o", str(tmp_path / "e.npy")],
        "missing reference": ["score", "--ref", str(tmp_path / "nope.png"), img],
        "batch size": ["embed", img, "-o", str(tmp_path / "b.npy"), "--batch-size", "0"],
        "top k": ["score", "--ref", img, img, "--top-k", "-1"],
        "unknown dtype": ["score", "--ref", img, img, "--dtype", "fp8"],
        "device typo": ["score", "--ref", img, img, "--model", model, "--device", "cdua"],
        "absent gpu": ["score", "--ref", img, img, "--model", model, "--device", "cuda:7"],
        "missing model dir": ["score", "--ref", img, img, "--model", str(tmp_path / "no-model")],
        "model is a text file": ["score", "--ref", img, img, "--model", str(a_file)],
        "unreadable image": ["score", "--ref", img, str(broken), "--model", model],
        "nothing readable": ["embed", str(broken), "-o", str(tmp_path / "n.npy"), "--model", model, "--skip-unreadable"],
    }


CASES = ["output is a directory", "output under a file", "output suffix", "missing image", "empty directory",
         "missing reference", "batch size", "top k", "unknown dtype", "device typo", "absent gpu", "missing model dir",
         "model is a text file", "unreadable image", "nothing readable"]


@pytest.mark.parametrize("case", CASES)
def test_user_mistakes_exit_2_with_one_message(case, tmp_path, image_files, release_dir, capsys):
    argv = _bad_invocations(tmp_path, image_files, release_dir)[case]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "error:" in err
    assert not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob(".*.tmp"))


def test_device_errors_list_the_available_devices(release_dir, image_files, capsys):
    assert main(["score", "--ref", str(image_files[0]), str(image_files[1]), "--model", str(release_dir),
                 "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "cuda:7" in err and "available here: cpu" in err


def test_cli_errors_come_from_a_fresh_process_without_torch(tmp_path):
    """`nearid --help` and usage errors are answered before torch is imported (they took ~11 s on a cold start)."""
    import subprocess
    import sys

    probe = ("import sys, nearid_core.cli as c\n"
             "try:\n    c.main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('torch' in sys.modules, code)")
    out = subprocess.run([sys.executable, "-c", probe, "score", "--ref", str(tmp_path / "nope.png"), "x.png"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "2"], out.stderr
    assert "image file not found" in out.stderr and "Traceback" not in out.stderr
    help_out = subprocess.run([sys.executable, "-m", "nearid_core.cli", "--help"], capture_output=True, text=True,
                              timeout=120)
    assert help_out.returncode == 0 and "score" in help_out.stdout


def test_skip_unreadable_reports_what_it_skipped(release_dir, image_files, scorer, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in image_files:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_broken.png").write_bytes(b"not an image")
    os.symlink(folder / "loop.png", folder / "loop.png")
    out = tmp_path / "emb.safetensors"
    assert main(["embed", str(folder), "-o", str(out), "--model", str(release_dir), "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "--skip-unreadable" in err and not out.exists()
    assert main(["embed", str(folder), "-o", str(out), "--model", str(release_dir), "--dtype", "fp32",
                 "--skip-unreadable", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable" in err and "symlink loop" in err and "zz_broken.png" in err
    with safe_open(str(out), "pt") as f:
        emb, files = f.get_tensor("embeddings"), json.loads(f.metadata()["files"])
    assert files == [str(folder / p.name) for p in image_files]
    torch.testing.assert_close(emb, scorer.embed(files), atol=1e-5, rtol=0)


def test_npy_output_has_a_sidecar_naming_each_row(release_dir, image_files, scorer, tmp_path):
    out = tmp_path / "emb.npy"
    files = [str(p) for p in image_files[::-1]]
    assert main(["embed", *files, "-o", str(out), "--model", str(release_dir), "--dtype", "fp32"]) == 0
    side = json.loads(sidecar_path(out).read_text())
    assert side["files"] == files and side["model"] == str(release_dir)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), scorer.embed(files), atol=1e-5, rtol=0)


def test_embed_replaces_an_existing_output_atomically(release_dir, image_files, tmp_path, monkeypatch):
    """A failure while writing leaves the old file intact and no temporary file behind."""
    import safetensors.torch

    out = tmp_path / "emb.safetensors"
    out.write_bytes(b"old contents")

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    assert main(["embed", str(image_files[0]), "-o", str(out), "--model", str(release_dir)]) == 2
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.safetensors"]


def test_embed_output_permissions_links_and_case(release_dir, image_files, tmp_path):
    target = tmp_path / "real.npy"
    target.write_bytes(b"old")
    link = tmp_path / "link.npy"
    os.symlink(target, link)
    assert main(["embed", str(image_files[0]), "-o", str(link), "--model", str(release_dir)]) == 0
    assert link.is_symlink() and np.load(target).shape[0] == 1
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert main(["embed", str(image_files[0]), "-o", str(tmp_path / "UP.NPY"), "--model", str(release_dir)]) == 0
    assert (tmp_path / "UP.npy").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_sidecar_that_is_a_directory_is_refused_up_front(tmp_path, image_files):
    (tmp_path / "e.npy.json").mkdir()
    with pytest.raises(SystemExit) as exc:
        parse_args(["embed", str(image_files[0]), "-o", str(tmp_path / "e.npy")])
    assert exc.value.code == 2
