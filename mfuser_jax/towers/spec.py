"""What MFuser's code needs to know about a pretrained tower, in four groups.

A tower is a vision-language model (VLM: CLIP, EVA02-CLIP, SigLIP; an image tower fused
with the VFM and a text tower giving the class queries) or a vision foundation model (VFM:
DINOv2, DINOv3; the image tower fused layer by layer with the VLM's). Each lives in its own
folder, ``towers/<name>/``, whose ``spec.py`` ties its parts together in one of these:

* ``config``: the tower's section of ``config.model`` at full size and at size=tiny, its
  patch size and (VLM) the reference optimizer's weight decay for the variant;
* ``build``: how the model builds it (the classes and functions of its ``model.py``,
  ``fusion.py`` and ``tokenizer.py``);
* ``weights``: how its official files become the tower's state dict (``convert.py``);
* ``release`` (VLM): how MFuser's released checkpoints of the variant differ from the model.

Every field is read by name where it is used (the model, the converters, the configs, the
command lines); no code branches on a tower's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["TowerConfig", "VFMBuild", "VFMSpec", "VLMBuild", "VLMRelease", "VLMSpec",
           "Weights"]


def _frozen(mapping) -> MappingProxyType:
    return MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True, eq=False)
class TowerConfig:
    """The tower's section of ``config.model`` (``config.model[name]``).

    large: every field at full size (the builders read these names). tiny: the fields that
    differ at size=tiny (a few-layer model for tests and smoke runs). patch_size: the
    tower's patch size (a VLM's sets ``model.patch_size``, the VFM is built at it).
    runtime: fields of the section that do not change the network or what its weights
    mean (a workdir may be evaluated with other values). weight_decay (VLM): the reference
    optimizer config's for this variant; no_decay_keys (VLM): mmcv custom_keys with
    decay_mult 0 (a parameter whose dotted path contains one trains without weight decay).
    """

    large: Mapping[str, Any]
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    patch_size: int = 16
    runtime: tuple[str, ...] = ()
    weight_decay: float = 1e-5
    no_decay_keys: tuple[str, ...] = ("norm",)

    def __post_init__(self):
        unknown = (set(self.tiny) | set(self.runtime)) - set(self.large)
        if unknown:
            raise ValueError(f"tiny/runtime name fields large lacks: {sorted(unknown)}")
        object.__setattr__(self, "large", _frozen(self.large))
        object.__setattr__(self, "tiny", _frozen(self.tiny))

    def section(self, large: bool) -> dict:
        """A fresh copy of the section at full size (``large``) or size=tiny."""
        return dict(self.large) if large else {**self.large, **self.tiny}


@dataclasses.dataclass(frozen=True, eq=False)
class Weights:
    """The official weight file (``scripts/convert_weights.py --<name> FILE``).

    convert -> VLM: ``convert(state_dict, *, img_size, patch_size, context_length)`` ->
      (image tower state dict, text tower state dict, extra frozen backbone arrays by
      name); VFM: ``convert(state_dict, c, *, img_size, patch_size, source)`` -> the
      tower's state dict (``c``: its config section). Renamed and resized as the reference
      loads the file.
    file: the official file's name (for help and messages); help: the flag's help.
    """

    convert: Callable[..., Any]
    file: str
    help: str


def _cosine_over_temperature(backbone, score_map, temperature):
    """CLIP-style score-map logits: the cosine score map over the loss temperature (0.07)."""
    del backbone
    return score_map, temperature


@dataclasses.dataclass(frozen=True, eq=False)
class VLMBuild:
    """How the model builds a VLM (called with the config section ``c``).

    backbone: the ``model.backbone.FusedBackbone`` subclass of this VLM (its ``fusion.py``):
      ``backbone(c, **fusion)`` where ``fusion`` is what every variant shares (sizes, the
      VFM, MVFusers, dtype, rngs). The encoder converter builds the towers with it too.
    text(c, *, context_length, dtype, rngs) -> the text tower taking ``(ids, contexts)``.
    tokenizer(c, path) -> ``tokenize(names) -> (K, c.token_length)`` ids; ``path`` is the
      file ``tokenizer_file`` names (None when none is needed).
    tokenizer_file: a file the tokenizer reads (e.g. "spiece.model"), given with
      ``--<name>_tokenizer`` and copied beside the converted weights, found there as
      ``<model.pretrained>/<tokenizer_file>`` unless ``c.tokenizer`` names it;
      tokenizer_source: what it is and where it comes from (for messages).
    score_logits(backbone, score_map, temperature) -> (logits, temperature) of the score-map
      loss. analytic_flops: run/flops.py's formulas describe these towers (CLIP's layout).
    """

    backbone: Callable[..., Any]
    text: Callable[..., Any]
    tokenizer: Callable[[Any, str | None], Callable]
    tokenizer_file: str | None = None
    tokenizer_source: str = ""
    score_logits: Callable = _cosine_over_temperature
    analytic_flops: bool = False


def _nothing(model_config):
    del model_config
    return {}


def _no_scalars(state_dict):
    del state_dict
    return {}


@dataclasses.dataclass(frozen=True, eq=False)
class VLMRelease:
    """MFuser's released checkpoints of this variant (run/release.py).

    key: a key only this variant's releases hold (detects the variant).
    unused: regexes of keys the original saves but never reads (dropped on import).
    zeros(model_config) -> {key: shape}: those keys written back as zeros on export.
    recomputed(model) -> {key: (array, what)}: the buffers the original registers
      (persistent or not: mmcv's saver writes both) that the JAX model computes, with the
      dtype and value the original saves; checked against the release on import (then
      dropped), written on export. ``what`` describes each for the error message.
    scalars: frozen backbone parameters a release lacks (the original reads them from the
      VLM file): on import they come from ``scalars_from(VLM state dict)`` when the VLM file
      is given (``--<name>``), else NaN, and training from them is refused.
    """

    key: str
    unused: tuple[str, ...] = ()
    zeros: Callable[[Any], Mapping[str, tuple]] = _nothing
    recomputed: Callable[[Any], Mapping[str, tuple]] = _nothing
    scalars: tuple[str, ...] = ()
    scalars_from: Callable[[Mapping], Mapping] = _no_scalars


@dataclasses.dataclass(frozen=True, eq=False)
class VLMSpec:
    """A vision-language model: ``config.model.vlm`` names it (see the module docstring)."""

    name: str
    title: str
    config: TowerConfig
    build: VLMBuild
    weights: Weights
    release: VLMRelease

    def __post_init__(self):
        if self.build.tokenizer_file and "tokenizer" not in self.config.large:
            raise ValueError(f"VLM {self.name!r} reads {self.build.tokenizer_file}: its config "
                             "section needs a 'tokenizer' field (the file's path, '' = beside "
                             "the converted weights)")

    @property
    def tokenizer_flag(self) -> str | None:
        """convert_weights.py's flag for ``build.tokenizer_file`` (None when there is none)."""
        return f"{self.name}_tokenizer" if self.build.tokenizer_file else None

    def convert_args(self) -> str:
        """The convert_weights.py arguments that bring this VLM's files, for messages."""
        args = f"--{self.name} {self.weights.file}"
        if self.build.tokenizer_file:
            args += f" --{self.tokenizer_flag} {self.build.tokenizer_file}"
        return args


@dataclasses.dataclass(frozen=True, eq=False)
class VFMBuild:
    """How the model builds a VFM tower.

    tower(c, *, image_size, patch_size, layers, dtype, rngs) -> the image tower, exposing the
      protocol of ``model.backbone.VisionTower`` and ``num_prefix_tokens`` (class token plus
      register tokens, which precede the patch tokens).
    mean, std: the pixel statistics (0..255 units) the tower's images are normalised with.
    """

    tower: Callable[..., Any]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True, eq=False)
class VFMSpec:
    """A vision foundation model: ``config.model.vfm`` names it (see the module docstring).
    ``config.patch_size`` is its native patch size; a model of another patch size (the
    VLM's) resizes the patch kernel on conversion, as the reference does for DINOv2."""

    name: str
    title: str
    config: TowerConfig
    build: VFMBuild
    weights: Weights
