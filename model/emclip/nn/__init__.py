"""Networks of emclip: the SegmentationModel contract and its parts.

Importing this package imports torch and open_clip; ``emclip`` itself stays light.
"""

from .base import (
    PAD_LOGIT,
    ModelOutput,
    PromptBatch,
    SegmentationModel,
    build_prompt_batch,
    validate_images,
)
from .decoder import DecoderPrompts, TextGuidedPixelDecoder
from .em_aggregation import EMAggregation, em_objective
from .emclip import EMCLIP, combine_prompts
from .image_encoder import ImageEncoder, build_image_encoder
from .text_encoder import TextEncoder, build_text_encoder
from .unet import UNet

__all__ = [
    "EMCLIP",
    "DecoderPrompts",
    "PAD_LOGIT",
    "EMAggregation",
    "ImageEncoder",
    "ModelOutput",
    "PromptBatch",
    "SegmentationModel",
    "TextEncoder",
    "TextGuidedPixelDecoder",
    "UNet",
    "build_image_encoder",
    "build_prompt_batch",
    "build_text_encoder",
    "combine_prompts",
    "em_objective",
    "validate_images",
]
