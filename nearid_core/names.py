"""Names shared by the library and its command lines, in a module that imports nothing heavy, so that the CLIs parse
and check their arguments before torch or transformers load."""

from __future__ import annotations

DEFAULT_MODEL = "Aleksandar/nearid-siglip2"
REDUCTIONS = ("mean", "min", "max", "centroid")
READOUTS = ("map", "mean")  # the NearID MAP head, or the mean of the trunk's patch tokens (the siglip2-mean baseline)
INPUT_RANGES = ("0,1", "-1,1")
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")  # auto = the scorer's default for the device
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File suffixes treated as images when a directory is given (first match wins when looking up a stem)."""
