"""`nearid score` / `nearid embed`, called in-process through main(argv)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nearid_core import NearIDScorer
from nearid_core.cli import expand_images, main, parse_args


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
    with pytest.raises(Exception, match="not found"):
        expand_images([str(tmp_path / "nope.png")])
    with pytest.raises(Exception, match="no image files"):
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
