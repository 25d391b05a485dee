"""Which dtype is fast here: the default-precision policy every entry point (API, CLI, ComfyUI nodes, eval) uses.

* CUDA: fp16 weights under fp16 autocast (`autocast_for`), as the paper evaluated: LayerNorm and softmax in fp32.
* CPU: an explicit ``dtype`` wins, then the ``NEARID_CPU_DTYPE`` environment variable (``fp32`` / ``bf16``); then
  Intel AMX -> bf16; no bf16 instructions at all -> fp32; otherwise a timed probe decides. Feature flags alone cannot:
  with AVX512-BF16 and no AMX, bf16 matmuls ran 2x slower than fp32 on one Intel CPU and 4.2x faster on an AMD Zen 5.
  The probe times an fp32 and a bf16 ``F.linear`` at 512x1152x1152 (one warm-up, 3 interleaved repetitions, about
  50 ms) and picks bf16 only at >= 1.25x. Its result is cached per CPU model, torch version and thread count in
  ``$NEARID_CACHE_DIR`` (default ``~/.cache/nearid``), so it runs once per machine, and the decision is logged.
* In reduced precision on a CPU, the MAP head runs in fp32 (`head_dtype`): it is 0.6% of the FLOPs, and its
  ``nn.MultiheadAttention`` feeds strided views to ``F.linear``, which fall off the fast bf16 path (measured 227 vs
  24 ms/img at real size).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ENV_CPU_DTYPE = "NEARID_CPU_DTYPE"
ENV_CACHE_DIR = "NEARID_CACHE_DIR"
PROBE_SHAPE = (512, 1152, 1152)  # tokens x in x out: one so400m projection on ~0.7 image
PROBE_MIN_SPEEDUP = 1.25
_CPU_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo (x86 ``flags``, ARM ``Features``), or None where it is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


def _torch_probe(name: str) -> bool | None:
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else None
    except RuntimeError:
        return None


def cpu_bf16_support() -> str:
    """"amx" (bf16 matrix units), "bf16" (bf16 vector instructions only), "none", or "unknown"."""
    flags = _cpu_flags()
    if _torch_probe("_is_amx_tile_supported") or (flags is not None and "amx_bf16" in flags):
        return "amx"
    if _torch_probe("_is_avx512_bf16_supported") or (flags is not None and {"avx512_bf16", "bf16"} & flags):
        return "bf16"
    return "none" if flags is not None else "unknown"


def cpu_has_bf16_matmul() -> bool:
    """True when this CPU has bf16 matrix units (Intel AMX tiles)."""
    return cpu_bf16_support() == "amx"


def probe_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time / bf16 time of one ``F.linear`` at `PROBE_SHAPE` on this CPU (best of `repeats`, interleaved)."""
    n, k, m = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    times = {torch.float32: [], torch.bfloat16: []}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # the first round warms up both kernels
            for dtype, (x, w) in ((torch.float32, (x32, w32)), (torch.bfloat16, (x16, w16))):
                start = time.perf_counter()
                F.linear(x, w)
                if rep:
                    times[dtype].append(time.perf_counter() - start)
    return min(times[torch.float32]) / min(times[torch.bfloat16])


def _cache_file() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nearid")
    return Path(root) / "cpu_dtype_probe.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key() -> str:
    """What the cached probe result depends on: the CPU model, the torch version and the thread count."""
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cached_speedup(key: str) -> float | None:
    try:
        value = json.loads(_cache_file().read_text()).get(key)
        return float(value["speedup"]) if isinstance(value, dict) else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _store_speedup(key: str, speedup: float) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[key] = {"speedup": round(speedup, 3), "shape": list(PROBE_SHAPE)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".probe.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as err:  # a read-only home is no reason to fail: the probe reruns next time
        logger.debug("NearID: could not cache the dtype probe in %s: %s", path, err)


def measured_bf16_speedup() -> tuple[float, bool]:
    """(bf16 speedup over fp32 on this machine, whether it came from the cache); probes at most once per key."""
    key = probe_key()
    cached = _cached_speedup(key)
    if cached is not None:
        return cached, True
    speedup = probe_bf16_speedup()
    _store_speedup(key, speedup)
    return speedup, False


@functools.lru_cache(maxsize=None)
def _cpu_default_dtype(threads: int, override: str | None) -> torch.dtype:
    if override:
        if override.lower() not in _CPU_DTYPES:
            raise ValueError(f"{ENV_CPU_DTYPE}={override!r}: use fp32 or bf16 (or unset it for the measured choice).")
        dtype = _CPU_DTYPES[override.lower()]
        logger.info("NearID: CPU dtype %s from %s", dtype, ENV_CPU_DTYPE)
        return dtype
    support = cpu_bf16_support()
    if support == "amx":
        logger.info("NearID: CPU dtype bf16 (AMX bf16 matrix units)")
        return torch.bfloat16
    if support == "none":
        logger.info("NearID: CPU dtype fp32 (no bf16 instructions)")
        return torch.float32
    speedup, cached = measured_bf16_speedup()
    dtype = torch.bfloat16 if speedup >= PROBE_MIN_SPEEDUP else torch.float32
    logger.info("NearID: CPU dtype %s: bf16 matmul measured %.2fx fp32 (%s, %d threads; bf16 needs >= %.2fx)",
                str(dtype).removeprefix("torch."), speedup, "cached" if cached else "probed now", threads,
                PROBE_MIN_SPEEDUP)
    return dtype


def cpu_default_dtype() -> torch.dtype:
    """The CPU inference dtype by the policy in the module docstring (memoised per thread count and override)."""
    return _cpu_default_dtype(torch.get_num_threads(), os.environ.get(ENV_CPU_DTYPE) or None)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the paper's precision), the measured choice (`cpu_default_dtype`) on CPUs, fp32 elsewhere."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        return cpu_default_dtype()
    return torch.float32


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The numerics the paper ran on CUDA: fp16 weights under fp16 autocast, so LayerNorm and softmax compute in fp32
    while the matmuls and attention run in fp16. Elsewhere (CPUs, other dtypes) no autocast: a null context."""
    if device.type == "cuda" and dtype == torch.float16:
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def head_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The MAP head's dtype for a model running in `dtype` on `device`: fp32 on CPUs in reduced precision."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype
