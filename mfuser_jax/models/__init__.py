"""Flax NNX modules, one model per file; attribute names mirror the PyTorch originals."""

from mfuser_jax.models.backbone import MFuserBackbone, MFuserEVABackbone, MFuserSiglipBackbone
from mfuser_jax.models.clip import CLIPTextContextEncoder, CLIPTextEncoder, CLIPVisionTransformer
from mfuser_jax.models.dinov2 import DinoVisionTransformer
from mfuser_jax.models.eva02 import EVAVisionTransformer
from mfuser_jax.models.mask_decoder import TqdmHead
from mfuser_jax.models.mfuser import MFuser
from mfuser_jax.models.mvfuser import MVFuser
from mfuser_jax.models.pixel_decoder import TqdmMSDeformAttnPixelDecoder
from mfuser_jax.models.siglip import SiglipTextTransformer, SiglipVisionTransformer
from mfuser_jax.models.siglip_tokenizer import SiglipTokenizer
from mfuser_jax.models.text_enhancer import ContextDecoder, MTEnhancer
from mfuser_jax.models.tokenizer import tokenize

__all__ = [
    "CLIPTextContextEncoder",
    "CLIPTextEncoder",
    "CLIPVisionTransformer",
    "ContextDecoder",
    "DinoVisionTransformer",
    "EVAVisionTransformer",
    "MFuser",
    "MFuserBackbone",
    "MFuserEVABackbone",
    "MFuserSiglipBackbone",
    "MTEnhancer",
    "MVFuser",
    "SiglipTextTransformer",
    "SiglipTokenizer",
    "SiglipVisionTransformer",
    "TqdmHead",
    "TqdmMSDeformAttnPixelDecoder",
    "tokenize",
]
