"""The default-precision policy (nearid_core.precision) and the fp32 head next to a reduced-precision trunk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_nearid_model

import nearid_core.precision as precision
from nearid_core import NearIDScorer
from nearid_core.precision import cpu_default_dtype, default_dtype, head_dtype


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch, tmp_path):
    """Each test starts without the memo, the override or a cached probe result."""
    monkeypatch.setenv(precision.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV_CPU_DTYPE, raising=False)
    precision._cpu_default_dtype.cache_clear()
    yield
    precision._cpu_default_dtype.cache_clear()


def _machine(monkeypatch, support: str, speedup: float | None = None) -> list[int]:
    """Pretend to be a CPU with `support`; the probe returns `speedup` and counts its calls."""
    calls = []
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: support)

    def probe(repeats: int = 3) -> float:
        calls.append(1)
        if speedup is None:
            raise AssertionError("the probe must not run here")
        return speedup

    monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
    return calls


@pytest.mark.parametrize("support, speedup, expected", [
    ("amx", None, torch.bfloat16),  # matrix units: bf16 without timing
    ("none", None, torch.float32),  # no bf16 instructions at all: fp32 without timing
    ("bf16", 4.2, torch.bfloat16),  # AVX512-BF16 that is fast (Zen 5)
    ("bf16", 0.5, torch.float32),  # AVX512-BF16 that is slow (the Intel CPU without AMX)
    ("bf16", 1.2, torch.float32),  # not clearly faster: keep fp32
    ("unknown", 1.3, torch.bfloat16),  # flags unreadable: the probe decides
])
def test_cpu_dtype_follows_flags_then_the_probe(monkeypatch, support, speedup, expected):
    _machine(monkeypatch, support, speedup)
    assert cpu_default_dtype() == expected
    assert default_dtype(torch.device("cpu")) == expected
    assert default_dtype(torch.device("cuda")) == torch.float16


def test_probe_runs_once_per_machine_and_is_cached(monkeypatch, tmp_path, caplog):
    calls = _machine(monkeypatch, "bf16", 2.5)
    with caplog.at_level("INFO", logger="nearid_core.precision"):
        assert cpu_default_dtype() == torch.bfloat16
    assert "2.50x" in caplog.text and "probed now" in caplog.text
    precision._cpu_default_dtype.cache_clear()  # a new process
    assert cpu_default_dtype() == torch.bfloat16
    assert len(calls) == 1
    cached = json.loads((tmp_path / "cache" / "cpu_dtype_probe.json").read_text())
    assert cached[precision.probe_key()]["speedup"] == 2.5
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch build: probed again
    precision._cpu_default_dtype.cache_clear()
    cpu_default_dtype()
    assert len(calls) == 2


def test_unwritable_cache_still_decides(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(precision.ENV_CACHE_DIR, str(blocker / "sub"))
    _machine(monkeypatch, "bf16", 0.4)
    assert cpu_default_dtype() == torch.float32


@pytest.mark.parametrize("value, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_environment_override_wins_and_explicit_dtype_wins_over_it(monkeypatch, release_dir, value, expected):
    _machine(monkeypatch, "amx" if expected == torch.float32 else "none")
    monkeypatch.setenv(precision.ENV_CPU_DTYPE, value)
    assert cpu_default_dtype() == expected
    assert NearIDScorer.from_pretrained(release_dir, device="cpu").dtype == expected
    assert NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float16).dtype == torch.float16


def test_bad_override_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(precision.ENV_CPU_DTYPE, "int4")
    with pytest.raises(ValueError, match="NEARID_CPU_DTYPE='int4'"):
        cpu_default_dtype()


def test_the_real_probe_measures_a_positive_ratio():
    assert 0.01 < precision.probe_bf16_speedup(repeats=1) < 100


def test_flag_reading(monkeypatch):
    monkeypatch.setattr(precision, "_torch_probe", lambda name: None)
    for flags, expected in [({"avx512f", "avx512_bf16", "amx_bf16"}, "amx"), ({"avx512f", "avx512_bf16"}, "bf16"),
                            ({"asimd", "bf16"}, "bf16"), ({"avx2"}, "none"), (None, "unknown")]:
        monkeypatch.setattr(precision, "_cpu_flags", lambda flags=flags: flags)
        assert precision.cpu_bf16_support() == expected
    monkeypatch.setattr(precision, "_torch_probe", lambda name: name == "_is_amx_tile_supported")
    assert precision.cpu_bf16_support() == "amx"


# ----------------------------------------------------------------------------------------------------------------------
# The head in fp32 next to a bf16 trunk


def test_head_dtype_policy():
    assert head_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    assert head_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert head_dtype(torch.device("cuda"), torch.float16) == torch.float16


def test_fp32_head_is_the_same_module_semantics(release_dir):
    """A bf16 trunk with an fp32 head gives what a bf16 trunk gives to the same head in fp32 by hand, on every path
    (forward, get_image_features, encode_tokens + pool), and the head keeps the file's weights exactly."""
    s = NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.bfloat16)
    model = s.model
    reference = tiny_nearid_model(1)  # the weights release_dir was saved from, stored there in fp16
    for name, p in model.head.state_dict().items():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, reference.head.state_dict()[name].half().float(), atol=0, rtol=0)
    pixels = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        tokens = model.encode_tokens(pixels.bfloat16())
        assert tokens.dtype == torch.bfloat16
        pooled, attn = model.pool(tokens, output_attentions=True)
        by_hand = model.head(tokens.float())  # the transformers head module itself, in fp32
        torch.testing.assert_close(pooled, by_hand, atol=0, rtol=0)
        torch.testing.assert_close(model(pixels.bfloat16()).pooler_output, by_hand, atol=0, rtol=0)
        torch.testing.assert_close(model.get_image_features(pixels.bfloat16(), normalize=False), by_hand, atol=0, rtol=0)
    assert attn.shape == (2, 16)
    s.to(dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_fp16_runs_under_autocast_like_the_paper():
    """The paper evaluated fp16 weights under fp16 autocast (LayerNorm / softmax in fp32); the scorer's CUDA default
    does the same. CPUs and other dtypes run without autocast."""
    ctx = precision.autocast_for(torch.device("cuda"), torch.float16)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.float16
    for device, dtype in [("cpu", torch.bfloat16), ("cpu", torch.float32), ("cuda", torch.float32)]:
        assert not isinstance(precision.autocast_for(torch.device(device), dtype), torch.autocast)


def test_scorer_enters_the_precision_context(release_dir, monkeypatch):
    import nearid_core.scorer as scorer_mod

    entered = []

    class Recording:
        def __enter__(self):
            entered.append(1)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(scorer_mod, "autocast_for", lambda device, dtype: Recording())
    s = NearIDScorer.from_pretrained(release_dir, device="cpu", dtype=torch.float32)
    s.embed(torch.rand(2, 32, 32, 3))
    assert len(entered) == 1
    s.attention_maps(torch.rand(1, 32, 32, 3))
    assert len(entered) >= 2
