"""NearID identity embeddings: load a checkpoint, embed images, score and rank candidates by subject identity."""

from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import CheckpointNotFoundError as CheckpointNotFoundError
from .checkpoint import load_model as load_model
from .checkpoint import save_head_only as save_head_only
from .checkpoint import save_release as save_release
from .configuration_nearid import NearIDConfig as NearIDConfig
from .modeling_nearid import NearIDModel as NearIDModel
from .modeling_nearid import NearIDModelOutput as NearIDModelOutput
from .preprocessing import ImageInputError as ImageInputError
from .preprocessing import PreprocessConfig as PreprocessConfig
from .preprocessing import preprocess as preprocess
from .scorer import DEFAULT_MODEL as DEFAULT_MODEL
from .scorer import NearIDScorer as NearIDScorer
from .scorer import to_percent as to_percent

__version__ = "0.1.0"
