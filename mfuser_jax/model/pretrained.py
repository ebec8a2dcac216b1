"""The converted-encoder checkpoint: frozen VFM and VLM (image and text) weights.

``scripts/convert_weights.py`` builds the three towers at MFuser's sizes (the VLM named by
``config.model.vlm``: CLIP, EVA02-CLIP, SigLIP; the VFM by ``config.model.vfm``: DINOv2,
DINOv3; or others registered in ``mfuser_jax.towers.registry``), loads the official (or HF)
weights into them and saves their parameters with Orbax as the nested tree
``{"backbone": {VLM image tower..., "<vfm>": {...}}, "text_encoder": {...}}``
— the per-layer paths of ``MFuser`` (``nn.stack.per_layer_params``: stacked layers under
their indices, the original's names), so the file does not depend on how layers are stored.
``load_pretrained_encoders`` copies that tree into a model, checking every path and shape.
A VLM whose tokenizer reads a file keeps it in the folder too (SigLIP: ``spiece.model``).
"""

from __future__ import annotations

import os
from typing import Any

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mfuser_jax.model.factory import compute_values, require_concrete
from mfuser_jax.model.variants import (ENCODER_PREFIXES, build_backbone, build_text_encoder,
                                       is_pretrained_path, vfm_spec, vlm_spec)
from mfuser_jax.nn.stack import assign_slots, per_layer_params
from mfuser_jax.weights.state_dict import LOADED, load_torch_state_dict
from mfuser_jax.weights.torch_io import WeightFileError, read_state_dict

__all__ = ["encoder_tree", "load_pretrained_encoders", "save_pretrained_encoders"]


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
    else:
        out[prefix] = tree
    return out


def per_layer_tree(module: nnx.Module, keep=lambda path: True) -> dict:
    """``module``'s parameters as a nested dict under per-layer paths (stacked layers split
    into their indices), numpy values: the layout-independent encoder-checkpoint format."""
    tree: dict = {}
    for path, slot in per_layer_params(module, keep).items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = slot.get()
    return tree


def encoder_tree(*, visual: nnx.Module, vfm: nnx.Module, vfm_name: str,
                 text_encoder: nnx.Module, extra: dict | None = None) -> dict:
    """The three towers as the checkpoint's tree. ``extra``: more frozen backbone arrays by
    name (SigLIP's logit_scale/logit_bias)."""
    backbone = per_layer_tree(visual)
    backbone[vfm_name] = per_layer_tree(vfm)
    backbone.update(extra or {})
    return {"backbone": backbone, "text_encoder": per_layer_tree(text_encoder)}


def save_pretrained_encoders(path: str, tree: dict) -> None:
    """Write {"backbone": ..., "text_encoder": ...} (per-layer paths) as the converted-encoder
    checkpoint at ``path``: the one writer of this format (``encoder_tree`` builds the tree
    from the towers, ``run.release.frozen_encoder_tree`` from a whole MFuser)."""
    extra = sorted(set(tree) - set(ENCODER_PREFIXES))
    if extra:  # load_pretrained_encoders fills only these sub-trees: the rest would be lost
        raise ValueError(f"frozen parameters outside the encoders: {extra}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), {"params": _stringify(tree)}, force=True)
    checkpointer.wait_until_finished()


def _stringify(tree):
    # Orbax wants string keys; nnx.List indices are ints.
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_pretrained_encoders(model: nnx.Module, path: str) -> None:
    """Fill ``model``'s frozen encoders from ``path``; one clear error for any mismatch."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise WeightFileError(
            f"{path}: no converted encoder checkpoint here; create it with\n"
            "  python scripts/convert_weights.py --dinov2 dinov2_vitl14_pretrain.pth "
            f"--clip ViT-L-14-336px.pt --out {path}")
    try:
        restored = ocp.StandardCheckpointer().restore(path)
    except Exception as e:
        raise WeightFileError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from e
    flat = _flatten(restored.get("params", {}))
    params = per_layer_params(model)
    expected = {p for p in params if is_pretrained_path(p)}
    missing = sorted(".".join(p) for p in expected - set(flat))
    unexpected = sorted(".".join(p) for p in set(flat) - set(params))
    misshaped = [
        f"{'.'.join(p)}: model {params[p].shape}, checkpoint {tuple(v.shape)}"
        for p, v in flat.items()
        if p in params and params[p].shape != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{path} does not fit this model configuration (was it converted for "
                 "another image size, patch size or model size?)"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8])
                             + (" ..." if len(items) > 8 else ""))
        raise WeightFileError("\n".join(lines))
    assign_slots([(params[p], value) for p, value in flat.items()])



def convert_encoders(model_config, out: str, *, vfm_path: str, vlm_path: str,
                     tokenizer_path: str | None = None, progress=None) -> dict[str, int]:
    """Official/HF VFM and VLM files -> the converted-encoder checkpoint at ``out``.

    Towers are built at the sizes ``model_config`` asks for (e.g. CLIP: 512 px, patch 16,
    10 text positions) by the builders the model uses (``model.variants``: the fused
    backbone, whose VLM image tower and VFM are filled, and the text tower) from shapes
    (``nnx.eval_shape``: nothing is drawn at random, the backbone's adapters and FPN are
    never computed), the weights resized as the reference does, loaded strictly, and
    saved. ``vfm_path`` is the file of ``model_config.vfm`` (DINOv2 .pth/HF, DINOv3
    .pth/HF), ``vlm_path`` that of ``model_config.vlm`` (OpenAI/HF CLIP, EVA02-CLIP .pt,
    SigLIP .pth/HF), each renamed by its spec's ``weights.convert``; a VLM whose tokenizer
    reads a file (SigLIP's spiece.model) also needs ``tokenizer_path``, copied into
    ``out``. Returns the parameter count of each tower. ``progress(stage)`` is called per
    step (6 steps).
    """
    step = progress or (lambda stage: None)
    spec, vfm = vlm_spec(model_config), vfm_spec(model_config)
    vlm = spec.name
    if spec.build.tokenizer_file and not (tokenizer_path and os.path.isfile(tokenizer_path)):
        raise WeightFileError(f"{spec.title} needs {spec.build.tokenizer_source} too: "
                              f"--{spec.tokenizer_flag} {spec.build.tokenizer_file}")
    c = model_config[vlm]
    size, patch = model_config.image_size, model_config.patch_size

    def build():  # the model's own construction path
        rngs = nnx.Rngs(0)
        return (build_backbone(model_config, jnp.float32, rngs),
                build_text_encoder(model_config, rngs=rngs))

    def in_towers(path, _):  # in build's (backbone, text tower): the three towers' values
        return path[0] == 1 or path[1] in ("vlm", vfm.name)

    step(f"reading {vfm_path}")
    vfm_sd = vfm.weights.convert(read_state_dict(vfm_path), model_config[vfm.name],
                                 img_size=size, patch_size=patch, source=str(vfm_path))
    step(f"loading {vfm.title}")
    # Built from shapes: the strict loads fill every parameter and statistic of the towers
    # and the adapters and FPN the backbone holds too are not saved, so nothing is drawn at
    # random. Only the towers' other variables (buffers their constructors compute; the
    # built-in VLMs have none) are computed, by a jitted run of build that returns just them.
    backbone, text_encoder = towers = nnx.eval_shape(build)
    compute_values(towers, build, nnx.All(in_towers, nnx.Not(LOADED)))
    load_torch_state_dict(backbone.vfm, vfm_sd, module_name=f"{vfm.title} from {vfm_path}")
    del vfm_sd

    step(f"reading {vlm_path}")
    visual_sd, text_sd, extra = spec.weights.convert(
        read_state_dict(vlm_path), img_size=size, patch_size=patch,
        context_length=c.token_length + c.n_ctx)
    step(f"loading the {vlm} image tower")
    load_torch_state_dict(backbone.vlm, visual_sd,
                          module_name=f"{vlm} image tower from {vlm_path}")
    step(f"loading the {vlm} text tower")
    load_torch_state_dict(text_encoder, text_sd, module_name=f"{vlm} text tower from {vlm_path}")

    for name, tower in ((vfm.title, backbone.vfm), (f"the {vlm} image tower", backbone.vlm),
                        (f"the {vlm} text tower", text_encoder)):
        require_concrete(tower, name)  # e.g. a parameter the loader does not reach
    step(f"writing {out}")
    save_pretrained_encoders(out, encoder_tree(visual=backbone.vlm, vfm=backbone.vfm,
                                               vfm_name=vfm.name, text_encoder=text_encoder,
                                               extra=extra))
    if spec.build.tokenizer_file:  # found there as <model.pretrained>/<tokenizer_file>
        shutil.copyfile(tokenizer_path, os.path.join(out, spec.build.tokenizer_file))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    return {vfm.name: count(backbone.vfm), f"{vlm}_visual": count(backbone.vlm),
            f"{vlm}_text": count(text_encoder)}
