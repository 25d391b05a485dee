"""Opt-in int8 (`quantize="int8"`, `nearid embed --dtype int8`): close to fp32 on the tiny model, refused clearly
without torchao or off a CPU. The torchao tests skip where torchao is not installed."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

from nearid_core import NearIDScorer
from nearid_core.cli import main
from nearid_core.quantization import QuantizationError, check_quantize


@pytest.fixture(scope="module")
def fp32_scorer(release_dir):
    return NearIDScorer.from_pretrained(release_dir, dtype=torch.float32)


def _needs_torchao_and_compiler() -> None:
    pytest.importorskip("torchao")
    if not any(map(shutil.which, ("g++", "c++", "clang++"))):
        pytest.skip("torch.compile on a CPU needs a C++ compiler")


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(-1).min())


def test_int8_eager_close_to_fp32(release_dir, fp32_scorer, rgb_images):
    pytest.importorskip("torchao")
    scorer = NearIDScorer.from_pretrained(release_dir, quantize="int8", compile=False)
    assert scorer.quantize == "int8" and scorer.dtype == torch.float32  # fp32 elsewhere by default
    assert "quantize='int8'" in repr(scorer)
    linears = [m for m in scorer.model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [type(m.weight).__name__ != "Parameter" for m in linears]
    assert any(quantized) and not all(quantized)  # the trunk's linears, not the head's
    with torch.no_grad():
        assert _min_cosine(scorer.embed(rgb_images), fp32_scorer.embed(rgb_images)) > 0.999
        order, _ = scorer.rank(rgb_images[:1], rgb_images[1:])
        assert order.tolist() == fp32_scorer.rank(rgb_images[:1], rgb_images[1:])[0].tolist()


def test_int8_compiled_default_close_to_fp32(release_dir, fp32_scorer, rgb_images):
    _needs_torchao_and_compiler()
    scorer = NearIDScorer.from_pretrained(release_dir, quantize="int8")  # fp32 elsewhere, compiled
    assert all(layer._compiled_call_impl is not None for layer in scorer.model._tower.encoder.layers)
    with torch.inference_mode():
        assert _min_cosine(scorer.embed(rgb_images), fp32_scorer.embed(rgb_images)) > 0.999


def test_int8_in_bf16_runs_eager_and_close(release_dir, fp32_scorer, rgb_images):
    pytest.importorskip("torchao")
    scorer = NearIDScorer.from_pretrained(release_dir, quantize="int8", dtype=torch.bfloat16)
    assert all(layer._compiled_call_impl is None for layer in scorer.model._tower.encoder.layers)
    with torch.inference_mode():
        assert _min_cosine(scorer.embed(rgb_images), fp32_scorer.embed(rgb_images)) > 0.999


def test_int8_fingerprint_and_no_casting(release_dir, fp32_scorer):
    pytest.importorskip("torchao")
    scorer = NearIDScorer.from_pretrained(release_dir, quantize="int8", compile=False)
    again = NearIDScorer.from_pretrained(release_dir, quantize="int8", compile=False)
    assert scorer.fingerprint() == again.fingerprint() != fp32_scorer.fingerprint()  # int8 shards are not mixed in
    assert scorer.to("cpu", torch.float32) is scorer  # staying where it is is fine
    with pytest.raises(QuantizationError, match="Load it again"):
        scorer.to(dtype=torch.bfloat16)


def test_int8_without_torchao_names_the_extra(release_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantizationError, match=r"nearid-toolkit\[int8\]"):
        NearIDScorer.from_pretrained(release_dir, quantize="int8")


def test_quantize_refuses_unknown_scheme_and_gpus():
    check_quantize(None, torch.device("cuda"))
    check_quantize("int8", torch.device("cpu"))
    with pytest.raises(QuantizationError, match="one of int8"):
        check_quantize("int4", torch.device("cpu"))
    with pytest.raises(QuantizationError, match="for CPUs"):
        check_quantize("int8", torch.device("cuda:0"))


def test_cli_dtype_int8(release_dir, image_files, fp32_scorer, tmp_path):
    _needs_torchao_and_compiler()
    out = tmp_path / "int8.safetensors"
    assert main(["embed", *map(str, image_files), "-o", str(out), "--model", str(release_dir), "--dtype", "int8"]) == 0
    with safe_open(str(out), "pt") as f:
        embeddings = f.get_tensor("embeddings")
    assert _min_cosine(embeddings, fp32_scorer.embed([str(p) for p in image_files])) > 0.999


@pytest.mark.parametrize("case", ["no torchao", "gpu"])
def test_cli_dtype_int8_usage_errors(case, release_dir, image_files, tmp_path, monkeypatch, capsys):
    argv = ["embed", str(image_files[0]), "-o", str(tmp_path / "e.npy"), "--model", str(release_dir),
            "--dtype", "int8"]
    if case == "no torchao":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao"
                            else find_spec(name, *a))
    else:
        argv += ["--device", "cuda"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert ("nearid-toolkit[int8]" if case == "no torchao" else "CPUs only") in err
