"""ComfyUI nodes over nearid_core: model loader, embed, score, best-of-N, threshold filter, attention heatmap,
identity guidance.

Node IDs are frozen (saved workflows refer to them); rename display names only.
"""

import os
import sys

try:
    import nearid_core  # noqa: F401  (pip-installed, or the repository root already on sys.path)
except ImportError:  # cloned into custom_nodes/: ComfyUI imports the folder by path, so its root is not on sys.path
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from . import comfy_env  # noqa: E402
from .guidance import NearIDIdentityGuidance
from .heatmap import NearIDAttentionHeatmap
from .loader import NearIDModelHandle as NearIDModelHandle
from .loader import NearIDModelLoader
from .scoring import NearIDBestOfN, NearIDEmbed
from .scoring import NearIDEmbedding as NearIDEmbedding
from .scoring import NearIDScore, NearIDThresholdFilter

comfy_env.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "NearIDModelLoader": NearIDModelLoader,
    "NearIDEmbed": NearIDEmbed,
    "NearIDScore": NearIDScore,
    "NearIDBestOfN": NearIDBestOfN,
    "NearIDThresholdFilter": NearIDThresholdFilter,
    "NearIDAttentionHeatmap": NearIDAttentionHeatmap,
    "NearIDIdentityGuidance": NearIDIdentityGuidance,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NearIDModelLoader": "NearID Model Loader",
    "NearIDEmbed": "NearID Embed",
    "NearIDScore": "NearID Score",
    "NearIDBestOfN": "NearID Best-of-N",
    "NearIDThresholdFilter": "NearID Threshold Filter",
    "NearIDAttentionHeatmap": "NearID Attention Heatmap",
    "NearIDIdentityGuidance": "NearID Identity Guidance",
}

WEB_DIRECTORY = "./web"  # resolved by ComfyUI relative to the pack root (the repository root)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
