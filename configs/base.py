"""Shared defaults for every MFuser config (big_vision style: configs are code).

Each experiment file (gta2cs.py, ...) calls `make_config(train, eval, arg)`. The optional
argument after the file name, `--config configs/gta2cs.py:vlm=clip,small_gpu=True`, is a
comma-separated list of key=value pairs:

  vlm=clip|eva02|siglip   the vision-language tower: CLIP ViT-L/14-336 (default),
                          EVA02-CLIP-L/14-336 (patch 14) or SigLIP-L/16-384 (any name
                          registered in mfuser_jax/towers/registry.py; its spec sets the
                          tower section)
  vfm=dinov2|dinov3       the vision foundation model fused with it: DINOv2 ViT-L/14 (the
                          paper's, default) or DINOv3 ViT-L/16 (4 register tokens)
  size=large|tiny         model size (tiny: a few-layer model for smoke runs)
  small_gpu=True          for GPUs with less than ~80 GB: gradient accumulation over two
                          micro-batches (optim.grad_accum=2), activation rematerialisation
                          (model.remat=True, already the default at full size) and
                          bfloat16 compute (model.dtype). Same global batch, but NOT the
                          same recipe: bfloat16 rounding, and BatchNorm statistics and the
                          mask-loss normalisers are computed per micro-batch (the class-loss
                          groups of 2 images are kept). Measured on the demo in BENCHMARKS.md.

Every field can also be overridden on the command line: `--config.total_steps=40000`,
`--config.model.pretrained=weights/`, `--config.data_root=/data`.
"""

from mfuser_jax.data.labels import IGNORE_INDEX
from mfuser_jax.errors import ConfigError, UserError
from mfuser_jax.model.config import DEFAULT_VFM, ModelConfig
from mfuser_jax.towers import registry

# The config argument's keys and defaults; configs/demo.py and configs/custom.py add theirs.
ARGS = dict(vlm="clip", vfm=DEFAULT_VFM, size="large", small_gpu=False)


def __getattr__(name):
    # VLMS / VFMS: the registered tower names (mfuser_jax.towers.registry), read when asked
    # so that a tower registered after this module was imported is a valid `vlm=` too.
    if name == "VLMS":
        return registry.vlm_names()
    if name == "VFMS":
        return registry.vfm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_dict(fields=None):
    """``fields`` (nested dicts) as an ml_collections.ConfigDict. Imported here, not at the
    top: scripts/benchmark.py and mfuser_jax.run.flops read the model config on the GPU
    image, which has no ml_collections (they use ModelConfig, or `plain_model_config`)."""
    import ml_collections

    return ml_collections.ConfigDict(fields or {})


def parse_arg(arg, **defaults):
    """'a=1,b=x' -> ConfigDict with the defaults' keys and types (unknown keys: error)."""
    out = config_dict(defaults)
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            text = value.strip().lower() if sep else "true"
            if text not in ("1", "true", "yes", "", "0", "false", "no"):
                raise ConfigError(f"{key}={value!r}: expected True or False")
            value = text in ("1", "true", "yes", "")
        else:
            value = type(default)(value.strip())
        out[key] = value
    return out


def vlm_config(vlm):
    """The registered VLM's config section (mfuser_jax/towers/<vlm>/config.py); an unknown
    name is a ConfigError listing the registered ones."""
    try:
        return registry.vlm_config(vlm)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def mfuser_model_config(size=ARGS["size"], vlm=ARGS["vlm"], vfm=DEFAULT_VFM):
    """config.model for MFuser (the fields mfuser_jax.model.mfuser.MFuser reads): the
    ModelConfig preset (mfuser_jax/model/config.py, where each field is described) as a
    ConfigDict, so that --config.model.* overrides it."""
    return config_dict(plain_model_config(size, vlm, vfm))


def plain_model_config(size=ARGS["size"], vlm=ARGS["vlm"], vfm=DEFAULT_VFM) -> dict:
    """The same config.model as nested plain dicts, without ml_collections (code on the GPU
    image may also read ``ModelConfig.preset`` itself)."""
    try:  # an unknown size or tower name: a ConfigError listing the choices
        return ModelConfig.preset(size, vlm, vfm).to_dict()
    except UserError as e:
        raise ConfigError(str(e)) from None


def data_config(train, eval_sets, crop_size=512):
    """config.data (the fields mfuser_jax.data.pipeline reads; defaults follow the reference)."""
    d = config_dict()
    d.train = train                    # "gta" | "synthia" | "cityscapes" | ... | "synthetic";
                                       # "gta+synthia" mixes sources (data/mix.py)
    d.mix_ratios = ()                  # per-source sampling weights of a mix (() = equal)
    d.eval = tuple(eval_sets)          # the first must exist; later ones are optional
    d.crop_size = crop_size
    d.ratio_range = (0.5, 2.0)
    d.cat_max_ratio = 0.75
    d.flip_prob = 0.5
    d.photometric = True
    # Rare-class sampling from the statistics prepare_data.py writes; a missing file is an
    # error, as in the reference. enabled=False samples uniformly (not the paper's recipe).
    d.rcs = dict(enabled=True, class_temp=100.0, min_pixels=3000, min_crop_ratio=0.5)
    d.num_workers = 0                  # grain worker processes (0 = in-process)
    d.worker_buffer_size = 2           # batches each worker prepares ahead
    d.read_threads = 2                 # threads per process (or worker) preparing batches
    d.read_prefetch = 2                # batches read ahead by those threads
    d.skip_corrupt = False             # True: skip unreadable files with a warning
    d.synthetic = dict(num_train=2000, num_eval=100, image_size=(128, 256), seed=0)
    # The generic dataset "folder" (configs/custom.py fills it from a class list). Empty
    # label_ids: labels are Cityscapes trainIds; test_scale () = the images' own size.
    d.folder = dict(root="", classes="", label_ids=(), ignore_index=IGNORE_INDEX,
                    test_scale=())
    # Used by "tfds:<name>" sources (e.g. data.train="tfds:cityscapes").
    d.tfds = dict(name="", split="train", eval_split="validation", data_dir="",
                  image_key="image_left", label_key="segmentation_label",
                  label_map="cityscapes")
    return d


def get_base_config(args):
    """Defaults shared by all experiments; `args` from parse_arg (vlm, size, small_gpu)."""
    c = config_dict()
    c.total_steps = 20000
    # Global batch 4: the reference's dist_train.sh runs 2 GPUs x 2 images. Its README's
    # `python train.py CONFIG` runs one GPU, i.e. batch 2: --config.batch_size=2 runs that
    # reading (the class-loss normaliser groups, model.loss.cls_norm_images, follow).
    c.batch_size = 4
    # Float32 matmuls and convolutions in full float32, as PyTorch 2.0.1 runs float32
    # matmuls (its convolutions use TF32; full float32 there is the closer choice).
    # "default" lets Ampere/Hopper GPUs use TF32: faster, not the reference's numerics.
    c.matmul_precision = "highest"
    c.seed = 0
    c.log_every = 50
    c.log_parts = False                # True: the per-part losses on the console too (they
                                       # always go to metrics.jsonl and TensorBoard)
    c.checkpoint_every = 2000
    c.keep_checkpoints = 2             # older checkpoints are deleted as new ones are saved
    # Also keep the best evaluated model in W/best (a workdir of its own): "miou", "macc"
    # or "aacc", optionally ":<dataset>" (default the first evaluated) or ":average".
    c.save_best = ""
    # JAX's persistent compilation cache: "workdir" (W/compile_cache), a folder, or "off".
    # A resumed run, eval.py and predict.py on the same workdir load compiled programs
    # instead of compiling again.
    c.compile_cache = "workdir"
    c.profile_steps = ""               # "a,b": a jax.profiler trace of steps a..b in W/profile
    c.eval_every = 20000               # and always at the end
    c.data_root = "data"
    c.mesh = (("data", -1),)           # (axis, size) pairs; -1 = all remaining devices
    c.sharding = dict(
        fsdp_min_size=0)               # > 0: frozen params with >= this many elements are
                                       # split over 'data' (saves memory on many GPUs)
    c.distributed = dict(
        enabled="auto",                # auto: jax.distributed when SLURM/MPI/TPU is detected
        coordinator_address="", num_processes=1, process_id=0)
    c.optim = dict(
        # the reference's configs set it per VLM (CLIP 1e-4, EVA02 and SigLIP 1e-5)
        lr=1e-4, min_lr=1e-6, weight_decay=vlm_config(args.vlm).weight_decay,
        power=0.9, warmup_steps=1500,
        warmup_ratio=1e-6, b1=0.9, b2=0.999, eps=1e-8,
        grad_accum=1,                  # micro-batches per step (same global batch)
        grad_clip=0.0,                 # > 0: clip by global norm
        lr_mults=())                   # ((regex on param path, multiplier), ...)
    c.model = mfuser_model_config(args.size, args.vlm, args.vfm)
    # Sliding window of the training crop, stride 2/3 of it (512 / 341 in the reference).
    crop = c.model.image_size
    # Test-time augmentation (off in the paper's protocol), as mmseg's aug_test: flip adds
    # each image mirrored; ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), evaluate each
    # ratio of the dataset's test scale; probabilities averaged.
    c.evaluation = dict(crop_size=crop, stride=(2 * crop) // 3, crop_batch=6, flip=False,
                        ratios=())
    if args.small_gpu:
        c.optim.grad_accum = 2
        c.model.remat = True
        c.model.dtype = "bfloat16"
    return c


def make_config(train, eval_sets, arg=None):
    args = parse_arg(arg, **ARGS)
    c = get_base_config(args)
    c.data = data_config(train, eval_sets, crop_size=c.model.image_size)
    return c
