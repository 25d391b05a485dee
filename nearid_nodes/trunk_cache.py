"""What the SigLIP trunk computed for each image, kept on the model handle so that every NearID node of a prompt (and
of later prompts) reuses it: the embedding for Embed / Score / Best-of-N / Threshold and the MAP head's attention grid
for the Heatmap. Each distinct image then passes through the trunk once.

Entries are keyed by the image's content (a hash of its pixel bytes, shape and dtype) and by the model's identity
(content fingerprint of weights + preprocessing, and the dtype it runs in), so different images never share an entry.
They are small (D + grid floats, ~7.5 KB at so400m size) and evicted least-recently-used beyond `max_bytes`. Callers
get fresh tensors, never the cached ones, so nothing downstream can alter the cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from . import comfy_env

if TYPE_CHECKING:
    from .loader import NearIDModelHandle

DEFAULT_MAX_BYTES = 64 * 2**20  # ~8,900 so400m images


def image_key(image: torch.Tensor) -> bytes:
    """Content hash of one image [H, W, C] (any dtype or device): all its bytes, shape and dtype (~7 ms per float32
    megapixel image; no pixel is skipped, so images differing in one small edited region get different keys)."""
    data = image.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{tuple(image.shape)}{image.dtype}".encode())  # sha256: hardware-accelerated on most CPUs
    digest.update(memoryview(data))
    return digest.digest()[:16]


class TrunkCache:
    """Bounded LRU map: (model key, image key) -> (embedding [D], attention grid [gh, gw]), float32 on the CPU."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple, embedding: torch.Tensor, attention: torch.Tensor) -> None:
        entry = (embedding.detach().float().cpu().clone(), attention.detach().float().cpu().clone())
        size = sum(t.numel() * t.element_size() for t in entry)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= sum(t.numel() * t.element_size() for t in old)
            if size > self.max_bytes:
                return
            self._entries[key] = entry
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (e, a) = self._entries.popitem(last=False)
                self.nbytes -= e.numel() * e.element_size() + a.numel() * a.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


def encode(handle: NearIDModelHandle, images: torch.Tensor, pbar) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI IMAGE [B, H, W, C] -> (embeddings [B, D], attention grids [B, gh, gw]), float32 on the CPU.

    Only images not in `handle.cache` (each distinct one once) go through the trunk, in chunks of the loader's batch
    size, with progress (cached images count at once) and a Cancel check per chunk. The model is loaded onto its
    device only when something is missing.
    """
    scorer = handle.scorer
    model_key = (handle.fingerprint, str(scorer.dtype))
    keys = [(model_key, image_key(image)) for image in images]
    found = {key: handle.cache.get(key) for key in dict.fromkeys(keys)}
    first = {key: i for i, key in reversed(list(enumerate(keys)))}  # each distinct image's first row
    missing = sorted(i for key, i in first.items() if found[key] is None)
    if len(keys) > len(missing):
        pbar.update(len(keys) - len(missing))
    size = max(1, int(handle.batch_size))
    if missing:
        scorer = handle.ready()
    for start in range(0, len(missing), size):
        comfy_env.check_interrupt()
        rows = missing[start:start + size]
        embeddings, grids = scorer.embed_and_attend(images[rows], batch_size=size, layout="channels_last")
        for i, embedding, grid in zip(rows, embeddings, grids):
            handle.cache.put(keys[i], embedding, grid)
            found[keys[i]] = (embedding.float().cpu(), grid)
        pbar.update(len(rows))
    if not keys:
        vision = scorer.model.config.vision_config
        grid = vision.image_size // vision.patch_size
        return torch.empty(0, scorer.embed_dim), torch.empty(0, grid, grid)
    return torch.stack([found[k][0] for k in keys]), torch.stack([found[k][1] for k in keys])
