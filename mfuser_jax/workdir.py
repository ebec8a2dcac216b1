"""A workdir remembers the model it holds: W/config.json, checked before W is restored.

Training and the release converter write W/config.json. Evaluating, predicting or resuming
W with a config that builds another model (another vision-language tower, other widths or
depths) would at best end in Orbax's tree diff and at worst restore into a model that
computes something else (a different head count loads fine); `check_workdir_model` stops
first with one line naming the field, both values and the config argument to use.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mfuser_jax.errors import UserError
from mfuser_jax.files import atomic_write
from mfuser_jax.model.config import ModelConfig, architecture_leaves, with_recorded_vfm
from mfuser_jax.towers.registry import vlm_names

CONFIG_FILE = "config.json"

def config_json(config: Any) -> str:
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(indent=1)
    return json.dumps(dict(config), default=str, indent=1)


def write_config(workdir: str, config: Any) -> None:
    """W/config.json, replaced atomically (a killed run never leaves half a file)."""
    path = os.path.join(workdir, CONFIG_FILE)
    with atomic_write(path) as (tmp,), open(tmp, "w") as f:
        f.write(config_json(config))


def read_saved_config(workdir: str) -> dict | None:
    """W/config.json as a dict; None without a readable file."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def config_from_workdir(workdir: str) -> Any:
    """The config W was trained (or converted) with, from W/config.json: what
    scripts/eval.py and predict.py use without --config. JSON lists become tuples again,
    as the config files write them."""
    import ml_collections
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
    saved = read_saved_config(os.path.dirname(path))
    if saved is None:
        raise UserError(f"no readable {path} (training and the release converter write it): "
                        "give the config with --config")

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    if isinstance(saved.get("model"), dict):
        saved["model"] = with_recorded_vfm(saved["model"])
    return ml_collections.ConfigDict(tuples(saved))


def read_model_config(workdir: str) -> dict | None:
    """config.model as W/config.json recorded it; None without a readable file."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            model = json.load(f).get("model")
    except (OSError, ValueError):
        return None
    return model if isinstance(model, dict) else None


def architecture(model: dict, prefix: str = "model") -> dict[str, Any]:
    """{'model.image_size': 512, 'model.dinov2.embed_dim': 1024, ...}: the leaves of
    config.model (JSON-normalised) that define the network or what its weights mean.

    MFuser's are those whose ModelConfig field is marked architecture (the towers'
    sections: every field but the run-time ones), so dtype, remat, the pretrained path,
    losses, dropout and drop-path rates, the scan backend and the class names may differ
    between training and evaluation. Another model (config.model.name) has no typed
    config saying which of its fields are run-time: every leaf is compared."""
    if model.get("name") == ModelConfig.NAME:
        return architecture_leaves(model, prefix)
    return _leaves(model, prefix)


def _leaves(tree: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        out.update(_leaves(value, path) if isinstance(value, dict) else {path: value})
    return out


def has_checkpoints(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def check_model_config(config: Any) -> None:
    """MFuser configs: the tower named by model.vlm must have its section (set the VLM
    with the config argument, which also sets the section; model.vlm alone cannot)."""
    model = config.model
    if model.get("name") != "mfuser":
        return
    vlm = model.vlm
    if vlm not in model or not hasattr(model[vlm], "keys"):
        raise UserError(f"config.model.vlm={vlm!r} has no config.model.{vlm} section: choose "
                        "the tower with the config argument, e.g. --config "
                        f"configs/gta2cs.py:vlm=eva02 (one of {', '.join(vlm_names())})")


def check_workdir_model(config: Any, workdir: str) -> None:
    """Refuses a config whose model differs from the one W's checkpoints were trained with
    (as W/config.json records it). Fields missing on either side are not compared."""
    check_model_config(config)
    saved = read_model_config(workdir)
    if saved is None or not has_checkpoints(workdir):
        return
    want = architecture(saved)
    got = architecture(json.loads(config_json(config.model)))
    diff = [(k, want[k], got[k]) for k in want if k in got and want[k] != got[k]]
    if not diff:
        return
    where = os.path.join(workdir, CONFIG_FILE)
    towers = [(k[len("model."):], a, b) for key in ("model.vlm", "model.vfm")
              for k, a, b in diff if k == key]
    if towers:  # the config argument chooses them: name the one to append
        held = " and ".join(f"{name}={a!r}" for name, a, _ in towers)
        built = " and ".join(f"{name}={b!r}" for name, _, b in towers)
        arg = ",".join(f"{name}={a}" for name, a, _ in towers)
        raise UserError(f"{workdir} holds a {held} model ({where}) but the config builds "
                        f"{built}: append ':{arg}' to the config file name (e.g. --config "
                        f"configs/gta2cs.py:{arg})")
    shown = "; ".join(f"{k}={a!r} there, {b!r} here" for k, a, b in diff[:3])
    more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
    size = (" (configs/*.py: :size=tiny or :size=large)"
            if saved.get("name") == "mfuser" else "")
    raise UserError(f"{workdir} holds another model than this config builds ({where}): "
                    f"{shown}{more}; use the config it was trained with{size}")
