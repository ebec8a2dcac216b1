"""MFuser's model config as one typed, frozen value: ``ModelConfig`` and its sections.

The shape follows bonsai's ``ModelConfig`` and gemma's ``TransformerConfig``: frozen
dataclasses with named presets (``ModelConfig.preset("large" | "tiny", vlm=, vfm=)``).
big_vision-style config files and ml_collections' ConfigDict stay at the flag edge:
configs/base.py builds ``config.model`` as ``ConfigDict(ModelConfig.preset(...).to_dict())``
and ``MFuser`` reads ``ModelConfig.from_mapping(config.model)``; W/config.json holds
``to_dict()``'s JSON.

Every field says whether it is *architecture* (it defines the network or what its weights
mean: a workdir trained with one value cannot be evaluated or resumed with another) or
*run-time* (it may differ between training and evaluation). The workdir check
(``mfuser_jax.workdir``) compares the architecture leaves this module derives from that
metadata (``architecture_leaves``). The towers' sections (``config.model[vlm]`` and
``config.model[vfm]``) hold what each tower's spec lists (``TowerConfig.large``/``tiny``);
their fields are architecture unless the spec names them run-time (``TowerConfig.runtime``).

No ml_collections here (code on the GPU image reads ``ModelConfig.preset`` directly).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from mfuser_jax.data.labels import CLASSES
from mfuser_jax.errors import UserError
from mfuser_jax.towers.registry import vfm_config, vlm_config

__all__ = ["ARCHITECTURE", "DEFAULT_VFM", "KIND", "RUNTIME", "SECTION", "SIZES",
           "ContextDecoderConfig", "DecoderConfig", "LossConfig", "MVFuserConfig",
           "ModelConfig", "Section", "architecture_leaves", "with_recorded_vfm"]

# Field metadata: KIND is one of these.
KIND = "kind"
ARCHITECTURE = "architecture"  # defines the network or what its weights mean
RUNTIME = "run-time"           # may differ between training and evaluation
SECTION = "section"            # a nested config; its own fields decide

SIZES = ("large", "tiny")
DEFAULT_VFM = "dinov2"

def _tower(name: str, *, vfm: bool):
    """The tower's config section (towers/<name>/config.py, through the registry); an
    unknown name is a UserError listing the registered ones."""
    try:
        return vfm_config(name) if vfm else vlm_config(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def _tower_fields(name: str, *, vfm: bool) -> tuple[str, ...]:
    """The fields of a tower's section, in its spec's order."""
    return tuple(_tower(name, vfm=vfm).large)


def _runtime_tower_fields(name: str, *, vfm: bool) -> frozenset[str]:
    """The tower section's fields its spec names run-time (none for an unknown tower)."""
    try:
        return frozenset((vfm_config(name) if vfm else vlm_config(name)).runtime)
    except ValueError:
        return frozenset()


def _field(kind: str, default: Any = dataclasses.MISSING, section: type | None = None):
    metadata = {KIND: kind}
    if section is not None:
        metadata["type"] = section
    return dataclasses.field(default=default, metadata=metadata)


def _architecture(default: Any = dataclasses.MISSING):
    return _field(ARCHITECTURE, default)


def _runtime(default: Any = dataclasses.MISSING):
    return _field(RUNTIME, default)


def _section(cls: type):
    return _field(SECTION, section=cls)


def _freeze(value: Any) -> Any:
    """Lists (JSON) become tuples and mappings ``Section``s: every value is hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if _is_mapping(value):
        return Section({k: _freeze(v) for k, v in value.items()})
    return value


def _is_mapping(value: Any) -> bool:
    # dict, Mapping, ConfigDict (which is neither), a section dataclass
    return hasattr(value, "keys") and hasattr(value, "items")


def _thaw(value: Any) -> Any:
    if isinstance(value, (Section, _Config)):
        return value.to_dict()
    if isinstance(value, tuple):
        return tuple(_thaw(v) for v in value)
    return value


def _closest(key: str, known) -> list[str]:
    return difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)


def _check_keys(mapping: Mapping, expected, required, where: str) -> None:
    """UserError for the first key of ``mapping`` not in ``expected`` (with the closest
    names) or the first of ``required`` it lacks."""
    for key in mapping.keys():
        if key not in expected:
            close = _closest(str(key), expected)
            hint = (f"did you mean {' or '.join(f'{where}.{c}' for c in close)}?" if close
                    else f"its fields: {', '.join(expected)}")
            raise UserError(f"{where} has no field {key!r}; {hint}")
    for key in required:
        if key not in mapping:
            raise UserError(f"{where}.{key} is missing (its fields: {', '.join(expected)})")


class Section(Mapping):
    """A frozen, hashable mapping read like a ConfigDict (``s.width``, ``s["width"]``): a
    tower's config section, and ``ModelConfig.towers``."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping | None = None, /, **fields: Any):
        merged = {**dict(items.items() if items is not None else ()), **fields}
        object.__setattr__(self, "_items", {k: _freeze(v) for k, v in merged.items()})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_items")[name]
        except KeyError:
            raise AttributeError(f"config section has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __reduce__(self):
        return (Section, (self._items,))

    def __repr__(self) -> str:
        return f"Section({self._items!r})"

    def to_dict(self) -> dict:
        return {k: _thaw(v) for k, v in self._items.items()}


class _Config:
    """What every config dataclass shares: read like a ConfigDict (``c["width"]``,
    ``c.get(...)``, ``"width" in c``), ``to_dict``, ``replace`` and ``from_mapping``."""

    _virtual: ClassVar[tuple[str, ...]] = ()  # fields to_dict() expands in place

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata.get(KIND) != SECTION:
                object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))

    def keys(self) -> tuple[str, ...]:
        """The keys of ``to_dict()``."""
        out = []
        for f in dataclasses.fields(self):
            out.extend(getattr(self, f.name).keys() if f.name in self._virtual else [f.name])
        return tuple(out)

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: Any) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self):
        return tuple((k, self[k]) for k in self.keys())

    def replace(self, **changes: Any):
        """A copy with ``changes`` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Nested plain dicts (tuples kept): what ConfigDict and W/config.json hold."""
        return {f.name: _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_mapping(cls, mapping: Any, where: str = "config"):
        """``mapping`` (a dict or ConfigDict) as this type: unknown or missing keys are a
        UserError naming the key; lists become tuples."""
        if isinstance(mapping, cls):
            return mapping
        if not _is_mapping(mapping):
            raise UserError(f"{where} must be a section, not {type(mapping).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        _check_keys(mapping, list(fields), required, where)
        values = {}
        for key, value in mapping.items():
            kind = fields[key].metadata[KIND]
            if kind == SECTION:
                value = fields[key].metadata["type"].from_mapping(value, f"{where}.{key}")
            values[key] = value
        return cls(**values)


_frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@_frozen
class MVFuserConfig(_Config):
    """``config.model.mvfuser``: the Mamba co-adapters fusing the towers layer by layer."""

    d_state: int = _architecture()
    d_conv: int = _architecture()
    expand: int = _architecture()
    # The selective scan's implementation (mfuser_jax.ops.selective_scan): "auto" or one of
    # its backends; the same function.
    scan_backend: str = _runtime()

    @classmethod
    def preset(cls, size: str) -> MVFuserConfig:
        del size  # the same at both sizes
        return cls(d_state=16, d_conv=3, expand=1, scan_backend="auto")


@_frozen
class ContextDecoderConfig(_Config):
    """``config.model.context_decoder``: MTEnhancer, text queries attending to the visual
    context."""

    width: int = _architecture()
    heads: int = _architecture()
    layers: int = _architecture()
    dropout: float = _runtime()

    @classmethod
    def preset(cls, size: str) -> ContextDecoderConfig:
        large = _is_large(size)
        return cls(width=256 if large else 32, heads=4 if large else 2, layers=1, dropout=0.1)


@_frozen
class DecoderConfig(_Config):
    """``config.model.decoder``: the tqdm head (pixel decoder, then the masked-attention
    transformer decoder whose queries are the text embeddings)."""

    feat_channels: int = _architecture()
    num_heads: int = _architecture()           # the pixel decoder's and the decoder's
    pixel_decoder_layers: int = _architecture()
    decoder_layers: int = _architecture()
    ffn: int = _architecture()                 # the decoder layers' feed-forward width
    pixel_ffn: int = _architecture()           # the pixel decoder layers'
    deform_points: int = _architecture()       # sampling points per deformable-attention head

    @classmethod
    def preset(cls, size: str) -> DecoderConfig:
        large = _is_large(size)
        return cls(feat_channels=256 if large else 32, num_heads=8 if large else 2,
                   pixel_decoder_layers=6 if large else 1, decoder_layers=9 if large else 2,
                   ffn=2048 if large else 64, pixel_ffn=2048 if large else 64,
                   deform_points=4)


@_frozen
class LossConfig(_Config):
    """``config.model.loss``: Mask2Former's losses and the score-map loss."""

    cls: float = _runtime()                    # weight of the class cross-entropy
    mask: float = _runtime()                   # of the point-sampled mask BCE
    dice: float = _runtime()                   # of the dice loss
    score_map: float = _runtime()              # of the score-map cross-entropy
    no_object_weight: float = _runtime()       # class weight of "no object"
    num_points: int = _runtime()               # points sampled per mask
    oversample: float = _runtime()
    importance: float = _runtime()
    temperature: float = _runtime()            # of the score-map logits (CLIP: cosine / 0.07)
    # The class loss is normalised per group of this many images, then averaged: the
    # reference normalises per GPU (2 images each) and DDP averages the GPUs. 0 = one
    # normaliser over the whole (micro-)batch.
    cls_norm_images: int = _runtime()

    @classmethod
    def preset(cls, size: str) -> LossConfig:
        return cls(cls=2.0, mask=5.0, dice=5.0, score_map=1.0, no_object_weight=0.1,
                   num_points=12544 if _is_large(size) else 256, oversample=3.0,
                   importance=0.75, temperature=0.07, cls_norm_images=2)


def _is_large(size: str) -> bool:
    if size not in SIZES:
        raise UserError(f"size={size!r}: choose 'large' or 'tiny'")
    return size == "large"


@_frozen
class ModelConfig(_Config):
    """``config.model`` for MFuser (the fields mfuser_jax.model.mfuser.MFuser reads).

    ``towers`` holds the two towers' sections by name, ``towers[vfm]`` (DINOv2) and
    ``towers[vlm]`` (image tower, text tower and prompt lengths); read them as
    ``config[config.vlm]`` and ``config.dinov2``, as the ConfigDict and W/config.json
    spell them (there they sit at the top level of config.model).
    """

    NAME: ClassVar[str] = "mfuser"
    _virtual: ClassVar[tuple[str, ...]] = ("towers",)

    name: str = _architecture(NAME)
    vlm: str = _architecture()                 # the vision-language model (mfuser_jax.towers)
    vfm: str = _architecture(DEFAULT_VFM)      # the vision foundation model fused with it
    num_classes: int = _architecture()
    class_names: tuple[str, ...] = _runtime()
    # Both towers' patch size, the VLM's (EVA02: 14, 36 x 36 tokens at 512 px; others 16).
    patch_size: int = _architecture()
    # Training crop; position tables fit it. data.crop_size and evaluation.crop_size must
    # equal it (checked at start-up): override all three together. A model restored at
    # another size runs (the tables are resized) but computes something else.
    image_size: int = _architecture()
    dtype: str = _runtime()                    # compute dtype: "float32" | "bfloat16"
    # Stacked layers (24 fused backbone layers, 6 pixel-decoder and 9 decoder layers) run as
    # lax.scan: compiled once each. remat recomputes each layer in the backward pass and keeps
    # only the residual streams between layers: full-size CLIP step at batch 2, float32 (XLA's
    # CPU memory analysis): 3.9 GiB of temporaries instead of 39 GiB unrolled, for about one
    # more forward pass of those layers (+36% executed FLOPs). False: faster, needs the memory.
    remat: bool = _runtime()
    scan_layers: bool = _runtime()             # False: unrolled Python loop (comparisons only)
    # The towers' attention: "xla" (the default core: einsums with float32 softmax, compiled by
    # XLA) or "cudnn" (cuDNN flash attention on a GPU, bfloat16 only; token axes padded to a
    # multiple of 64 and masked).
    attn_implementation: str = _runtime()
    # Folder written by scripts/convert_weights.py; "" trains from random encoders (demo).
    pretrained: str = _runtime()
    # The towers' sections by name: the VFM's (DINOv2's depth is the VLM tower's `layers`:
    # the two are fused layer by layer), then the VLM's (image tower, text tower and prompt
    # lengths; mfuser_jax/towers/<vlm>/spec.py). Fields: architecture unless the spec's
    # TowerConfig.runtime lists them.
    towers: Section = _field(SECTION)
    out_indices: tuple[int, ...] = _architecture()  # fused layers whose tokens feed the FPN
    mvfuser: MVFuserConfig = _section(MVFuserConfig)
    context_decoder: ContextDecoderConfig = _section(ContextDecoderConfig)
    decoder: DecoderConfig = _section(DecoderConfig)
    loss: LossConfig = _section(LossConfig)
    # Prediction and report colours, one RGB triple per class (configs/custom.py sets them);
    # () = Cityscapes' colours for its classes, generated ones for others.
    palette: tuple[tuple[int, int, int], ...] = _runtime(())

    def __post_init__(self):
        super().__post_init__()
        if self.name != self.NAME:
            raise UserError(f"config.model.name={self.name!r}: ModelConfig is MFuser's "
                            f"config (name={self.NAME!r})")
        towers = self.towers if isinstance(self.towers, Section) else Section(self.towers)
        object.__setattr__(self, "towers", towers)
        fields = {f.name for f in dataclasses.fields(self)}
        for name, vfm in ((self.vfm, True), (self.vlm, False)):
            if name in fields:
                raise UserError(f"a tower named {name!r} would hide config.model.{name}")
            if name not in towers:
                raise UserError(f"config.model.{'vfm' if vfm else 'vlm'}={name!r} has no "
                                f"config.model.{name} section")
        extra = set(towers) - {self.vfm, self.vlm}
        if extra:
            raise UserError(f"config.model.towers holds {sorted(extra)}: only the sections "
                            f"of vfm={self.vfm!r} and vlm={self.vlm!r}")

    # ------------------------------------------------------------------ read like ConfigDict
    def __getattr__(self, name: str) -> Any:
        # config.dinov2, config.clip: the towers' sections (called only for other names)
        if not name.startswith("__"):
            towers = self.__dict__.get("towers")
            if towers is not None and name in towers:
                return towers[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __getitem__(self, key: str) -> Any:
        if key in self.towers:
            return self.towers[key]
        return super().__getitem__(key)

    def to_dict(self) -> dict:
        """config.model as nested plain dicts (tuples kept), the towers' sections at the top
        level: what ConfigDict and W/config.json hold."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._virtual:
                out.update(value.to_dict())
            else:
                out[f.name] = _thaw(value)
        return out

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, size: str, vlm: str = "clip", vfm: str = DEFAULT_VFM) -> ModelConfig:
        """The model of configs/base.py: ``size`` "large" (the paper's) or "tiny" (a
        few-layer model for tests and smoke runs), with the VLM and VFM named."""
        vlm_tower, vfm_tower = _tower(vlm, vfm=False), _tower(vfm, vfm=True)
        large = _is_large(size)
        patch = vlm_tower.patch_size
        return cls(
            vlm=vlm, vfm=vfm, num_classes=len(CLASSES), class_names=CLASSES,
            patch_size=patch, image_size=512 if large else 4 * patch, dtype="float32",
            remat=large, scan_layers=True, attn_implementation="xla",
            # the converted encoders (scripts/convert_weights.py); another VFM than the
            # paper's gets its own folder
            pretrained=((f"pretrained/mfuser_{vlm}_l" if vfm == DEFAULT_VFM
                         else f"pretrained/mfuser_{vlm}_{vfm}_l") if large else ""),
            towers=Section({vfm: vfm_tower.section(large), vlm: vlm_tower.section(large)}),
            out_indices=(7, 11, 15, 23) if large else (0, 1, 2, 3),
            mvfuser=MVFuserConfig.preset(size),
            context_decoder=ContextDecoderConfig.preset(size),
            decoder=DecoderConfig.preset(size),
            loss=LossConfig.preset(size),
        )

    @classmethod
    def from_mapping(cls, mapping: Any, where: str = "config.model") -> ModelConfig:
        """config.model as a ConfigDict or dict (a config file's, or W/config.json's) as a
        ModelConfig. The towers' sections are the keys named by ``vlm`` and ``vfm`` (absent
        ``vfm``, as in workdirs written before it existed: "dinov2"); each must hold its
        spec's fields. Unknown or missing keys are a UserError naming the key (and the
        closest known names); lists become tuples."""
        if isinstance(mapping, cls):
            return mapping
        if not _is_mapping(mapping):
            raise UserError(f"{where} must be a section, not {type(mapping).__name__}")
        vlm, vfm = mapping.get("vlm"), mapping.get("vfm", DEFAULT_VFM)
        if vlm is None:
            raise UserError(f"{where}.vlm is missing")
        tower_names = {vfm: _tower_fields(vfm, vfm=True), vlm: _tower_fields(vlm, vfm=False)}
        for key, name in (("vfm", vfm), ("vlm", vlm)):
            if name not in mapping:
                raise UserError(f"{where}.{key}={name!r} has no {where}.{name} section")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in cls._virtual}
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        _check_keys(mapping, [*fields, *tower_names], [*required, *tower_names], where)
        values, towers = {}, {}
        for key, value in mapping.items():
            if key in tower_names:
                if not _is_mapping(value):
                    raise UserError(f"{where}.{key} must be a section, not "
                                    f"{type(value).__name__}")
                _check_keys(value, tower_names[key], tower_names[key], f"{where}.{key}")
                towers[key] = value
            elif fields[key].metadata[KIND] == SECTION:
                values[key] = fields[key].metadata["type"].from_mapping(value, f"{where}.{key}")
            else:
                values[key] = value
        # the VFM's section first, as preset() and the config files order them
        return cls(**values, towers=Section({vfm: towers[vfm], vlm: towers[vlm]}))


def with_recorded_vfm(model: Mapping) -> Mapping:
    """An MFuser config.model as recorded: one written before ``vfm`` existed holds DINOv2,
    so it gets ``vfm=DEFAULT_VFM`` (a new dict, ``vfm`` first); any other is ``model``."""
    if model.get("name") == ModelConfig.NAME and "vfm" not in model:
        return {"vfm": DEFAULT_VFM, **model}
    return model


def architecture_leaves(model: Mapping, prefix: str = "model") -> dict[str, Any]:
    """{'model.image_size': 512, 'model.dinov2.embed_dim': 1024, ...}: the leaves of an
    MFuser config.model (a JSON dict or a ConfigDict, possibly of an older version,
    ``with_recorded_vfm``) whose ModelConfig field is architecture, in the mapping's order.
    The towers' sections are the keys named by its ``vlm`` and ``vfm``; keys ModelConfig
    does not know are left out."""
    model = with_recorded_vfm(model)
    vfm = model.get("vfm", DEFAULT_VFM)
    towers = {model.get("vlm"): _runtime_tower_fields(model.get("vlm"), vfm=False),
              vfm: _runtime_tower_fields(vfm, vfm=True)}
    out = {}
    _leaves(ModelConfig, model, prefix, towers, out)
    return out


def _leaves(cls: type, mapping: Mapping, prefix: str, towers: dict, out: dict) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in mapping.items():
        path = f"{prefix}.{key}"
        field = fields.get(key) if key not in cls._virtual else None
        if field is None:
            if key in towers and _is_mapping(value):
                out.update({f"{path}.{k}": v for k, v in value.items()
                            if k not in towers[key]})
        elif field.metadata[KIND] == SECTION:
            if _is_mapping(value):
                _leaves(field.metadata["type"], value, path, {}, out)
        elif field.metadata[KIND] == ARCHITECTURE:
            out[path] = value
