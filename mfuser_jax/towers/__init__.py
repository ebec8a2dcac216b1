"""The vision-language models MFuser fuses with DINOv2: one registry entry (``VLMSpec``) each.

The reference (devinxzhang/MFuser) has one segmentor file per VLM (mfuser_clip.py,
mfuser_eva_clip.py, mfuser_siglip.py) and one config per VLM. Here what differs between
them is gathered in one spec per VLM (``clip.py``, ``eva02.py``, ``siglip.py`` in this
package), and the model, the weight converters, the configs and the CLIs ask the spec named
by ``config.model.vlm`` instead of branching on the name. Adding a VLM is one spec file
(plus the modules its towers and weight renames live in) and one ``register_vlm`` call.

This package is imported by configs/base.py and mfuser_jax/run/flops.py, which must stay cheap
and run without torch (and without flax where the GPU image lacks it): a spec holds plain
data and functions that import the towers and converters when called, never at import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["VLMSpec", "get_vlm", "names", "register_vlm", "unregister_vlm"]


def _cosine_over_temperature(backbone, score_map, temperature):
    """CLIP-style score-map logits: the cosine score map over the loss temperature (0.07)."""
    del backbone
    return score_map, temperature


def _no_scalars(state_dict):
    del state_dict
    return {}


def _nothing(model_config):
    del model_config
    return {}


def _no_buffers(model):
    del model
    return {}


@dataclasses.dataclass(frozen=True, eq=False)
class VLMSpec:
    """Everything MFuser's code needs to know about one vision-language model.

    Config (read by configs/base.py; no heavy imports):
      name: the ``config.model.vlm`` value, the name of its config section and the
        convert_weights.py flag of its weight file.
      title: the model in words, for messages ("CLIP ViT-L/14-336").
      large: the ``config.model[name]`` section at full size (image tower ``width``,
        ``layers``, ``heads``, ``output_dim``; text tower ``text_width``, ``text_heads``,
        ``text_layers``, ``vocab_size``; prompt ``token_length`` and ``n_ctx``; plus what
        the tower builders read). ``tiny``: the fields that differ at size=tiny.
      patch_size: both towers' patch size (DINOv2's kernel is resized to it).
      weight_decay: the reference optimizer config's weight decay for this variant.
      no_decay_keys: mmcv custom_keys with decay_mult 0 (a parameter whose dotted path
        contains one trains without weight decay).

    Model (called with a model config's section ``c``):
      build_backbone(c, **fusion) -> the fused backbone (a ``models.backbone.FusedBackbone``);
        ``fusion`` is what every variant shares (sizes, DINOv2, MVFusers, dtype, rngs).
        The encoder converter builds the towers with it too: one construction path.
      build_text(c, *, context_length, dtype, rngs) -> the text tower taking
        ``(token ids, contexts)``.
      tokenizer(c, path) -> ``tokenize(names) -> (K, c.token_length)`` int array; ``path``
        is the file ``tokenizer_file`` names (None when the spec needs none).
      score_logits(backbone, score_map, temperature) -> (logits, temperature) of the
        score-map loss.
      analytic_flops: mfuser_jax.run.flops's formulas describe these towers (CLIP's layout).

    Encoder files (scripts/convert_weights.py --dinov2 ... --<name> FILE):
      convert_encoder(state_dict, *, img_size, patch_size, context_length) ->
        (image tower state dict, text tower state dict, extra frozen backbone arrays by
        name), renamed and resized as the reference loads the file.
      weights_file: the official file's name (for help and messages); weights_help.
      tokenizer_file: a file the tokenizer reads (e.g. "spiece.model"), given with
        ``--<name>_tokenizer`` and copied beside the converted weights, found there as
        ``<model.pretrained>/<tokenizer_file>`` unless ``c.tokenizer`` names it;
        tokenizer_source: what it is and where it comes from (for messages).

    Released MFuser checkpoints (run/release.py):
      release_key: a key only this variant's releases hold (detects the variant).
      release_unused: regexes of keys the original saves but never reads (dropped on import).
      release_zeros(model_config) -> {key: shape}: those keys written back as zeros on export.
      release_recomputed(model) -> {key: (array, what)}: the buffers the original registers
        (persistent or not: mmcv's saver writes both) that the JAX model computes, with the
        dtype and value the original saves; checked against the release on import (then
        dropped), written on export. ``what`` describes each for the error message.
      release_scalars: frozen backbone parameters a release lacks (the original reads them
        from the VLM file): on import they come from ``scalars_from(VLM state dict)`` when
        the VLM file is given (``--<name>``), else NaN, and training from them is refused.
    """

    name: str
    title: str
    large: Mapping[str, Any]
    build_backbone: Callable[..., Any]
    build_text: Callable[..., Any]
    tokenizer: Callable[[Any, str | None], Callable]
    convert_encoder: Callable[..., tuple]
    release_key: str
    weights_file: str
    weights_help: str
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    patch_size: int = 16
    weight_decay: float = 1e-5
    no_decay_keys: tuple[str, ...] = ("norm",)
    score_logits: Callable = _cosine_over_temperature
    analytic_flops: bool = False
    tokenizer_file: str | None = None
    tokenizer_source: str = ""
    release_unused: tuple[str, ...] = ()
    release_zeros: Callable[[Any], Mapping[str, tuple]] = _nothing
    release_recomputed: Callable[[Any], Mapping[str, tuple]] = _no_buffers
    release_scalars: tuple[str, ...] = ()
    scalars_from: Callable[[Mapping], Mapping] = _no_scalars

    def __post_init__(self):
        unknown = set(self.tiny) - set(self.large)
        if unknown:
            raise ValueError(f"VLM {self.name!r}: tiny sets fields large lacks: {sorted(unknown)}")
        if self.tokenizer_file and "tokenizer" not in self.large:
            raise ValueError(f"VLM {self.name!r} reads {self.tokenizer_file}: its config "
                             "section needs a 'tokenizer' field (the file's path, '' = beside "
                             "the converted weights)")
        object.__setattr__(self, "large", MappingProxyType(dict(self.large)))
        object.__setattr__(self, "tiny", MappingProxyType(dict(self.tiny)))

    def section(self, large: bool) -> dict:
        """A fresh copy of the config section at full size (``large``) or size=tiny."""
        return dict(self.large) if large else {**self.large, **self.tiny}

    @property
    def tokenizer_flag(self) -> str | None:
        """convert_weights.py's flag for ``tokenizer_file`` (None when there is none)."""
        return f"{self.name}_tokenizer" if self.tokenizer_file else None

    def convert_args(self) -> str:
        """The convert_weights.py arguments that bring this VLM's files, for messages."""
        args = f"--{self.name} {self.weights_file}"
        if self.tokenizer_file:
            args += f" --{self.tokenizer_flag} {self.tokenizer_file}"
        return args


_REGISTRY: dict[str, VLMSpec] = {}


def register_vlm(spec: VLMSpec) -> VLMSpec:
    """Add ``spec`` under ``spec.name`` (a second spec of the same name is an error)."""
    if not isinstance(spec, VLMSpec):
        raise TypeError(f"register_vlm takes a VLMSpec, not {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"a VLM named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_vlm(name: str) -> None:
    """Remove a registered VLM (tests register toy VLMs and remove them afterwards)."""
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered VLM names, in registration order (the built-in three first)."""
    return tuple(_REGISTRY)


def get_vlm(name: str) -> VLMSpec:
    """The spec registered as ``name``; an unknown name is a ValueError listing the known."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"vlm={name!r}: choose one of {names()}") from None


# The built-in VLMs register themselves on import (after the definitions they use above).
from mfuser_jax.towers.clip import spec as _clip  # noqa: E402,F401
from mfuser_jax.towers.eva02 import spec as _eva02  # noqa: E402,F401
from mfuser_jax.towers.siglip import spec as _siglip  # noqa: E402,F401
