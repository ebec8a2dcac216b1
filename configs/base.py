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

from mfuser_jax.towers import registry
from mfuser_jax.data.labels import CLASSES, IGNORE_INDEX

# The config argument's keys and defaults; configs/demo.py and configs/custom.py add theirs.
ARGS = dict(vlm="clip", vfm="dinov2", size="large", small_gpu=False)


def __getattr__(name):
    # VLMS / VFMS: the registered tower names (mfuser_jax.towers.registry), read when asked
    # so that a tower registered after this module was imported is a valid `vlm=` too.
    if name == "VLMS":
        return registry.vlm_names()
    if name == "VFMS":
        return registry.vfm_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(Exception):
    """A bad config argument. Not a ValueError on purpose: ml_collections re-raises those
    from config files with a traceback appended; the CLIs print this as one line."""


def config_dict(fields=None):
    """``fields`` (nested dicts) as an ml_collections.ConfigDict. Imported here, not at the
    top: scripts/benchmark.py reads `plain_model_config` on the GPU image, which has no
    ml_collections."""
    import ml_collections

    return ml_collections.ConfigDict(fields or {})


class Fields(dict):
    """A nested dict read and written like a ConfigDict (``c.decoder.ffn``, ``c.get(k)``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    __setattr__ = dict.__setitem__


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


def vlm_spec(vlm):
    """The registered VLM's spec (mfuser_jax/towers); an unknown name is a ConfigError
    listing the registered ones."""
    try:
        return registry.get_vlm(vlm)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def vfm_spec(vfm):
    """The registered VFM's spec (mfuser_jax/towers); an unknown name is a ConfigError
    listing the registered ones."""
    try:
        return registry.get_vfm(vfm)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def mfuser_model_config(size=ARGS["size"], vlm=ARGS["vlm"], vfm=ARGS["vfm"]):
    """config.model for MFuser (the fields mfuser_jax.model.mfuser.MFuser reads)."""
    return config_dict(plain_model_config(size, vlm, vfm))


def plain_model_config(size=ARGS["size"], vlm=ARGS["vlm"], vfm=ARGS["vfm"]) -> Fields:
    """The same config.model as nested `Fields`, for code that must run without
    ml_collections (scripts/benchmark.py and mfuser_jax.run.flops on the GPU image)."""
    spec, vfm_tower = vlm_spec(vlm), vfm_spec(vfm)
    if size not in ("large", "tiny"):
        raise ConfigError(f"size={size!r}: choose 'large' or 'tiny'")
    large = size == "large"
    m = Fields()
    m.name = "mfuser"
    m.vlm = vlm
    m.vfm = vfm
    m.num_classes = len(CLASSES)
    m.class_names = CLASSES
    # Both towers' patch size, the VLM's (EVA02: 14, 36 x 36 tokens at 512 px; others 16);
    # a VFM of another patch size has its kernel resized on conversion (DINOv2: 14 -> 16).
    m.patch_size = spec.config.patch_size
    # Training crop; position tables fit it. data.crop_size and evaluation.crop_size must
    # equal it (checked at start-up): override all three together.
    m.image_size = 512 if large else 4 * m.patch_size
    m.dtype = "float32"                        # compute dtype: "float32" | "bfloat16"
    # Stacked layers (24 fused backbone layers, 6 pixel-decoder and 9 decoder layers) run as
    # lax.scan: compiled once each. remat recomputes each layer in the backward pass and keeps
    # only the residual streams between layers: full-size CLIP step at batch 2, float32 (XLA's
    # CPU memory analysis): 3.9 GiB of temporaries instead of 39 GiB unrolled, for about one
    # more forward pass of those layers (+36% executed FLOPs). False: faster, needs the memory.
    m.remat = large
    m.scan_layers = True                       # False: unrolled Python loop (comparisons only)
    # The towers' attention: "xla" (the default core: einsums with float32 softmax, compiled by
    # XLA) or "cudnn" (cuDNN flash attention on a GPU, bfloat16 only; token axes padded to a
    # multiple of 64 and masked).
    m.attn_implementation = "xla"
    # Folder written by scripts/convert_weights.py; "" trains from random encoders (demo).
    m.pretrained = (f"pretrained/mfuser_{vlm}_l" if vfm == ARGS["vfm"]
                    else f"pretrained/mfuser_{vlm}_{vfm}_l") if large else ""
    # The VFM's section (mfuser_jax/towers/<vfm>/spec.py). Its depth is the VLM tower's
    # `layers`: the two are fused layer by layer.
    m[vfm] = Fields(vfm_tower.config.section(large))
    # The VLM's section: image tower, text tower and prompt lengths (towers/<vlm>/spec.py).
    m[vlm] = Fields(spec.config.section(large))
    m.out_indices = (7, 11, 15, 23) if large else (0, 1, 2, 3)
    m.mvfuser = Fields(d_state=16, d_conv=3, expand=1, scan_backend="auto")
    m.context_decoder = Fields(
        width=256 if large else 32, heads=4 if large else 2, layers=1, dropout=0.1)
    m.decoder = Fields(
        feat_channels=256 if large else 32, num_heads=8 if large else 2,
        pixel_decoder_layers=6 if large else 1, decoder_layers=9 if large else 2,
        ffn=2048 if large else 64, pixel_ffn=2048 if large else 64, deform_points=4)
    m.loss = Fields(
        cls=2.0, mask=5.0, dice=5.0, score_map=1.0, no_object_weight=0.1,
        num_points=12544 if large else 256, oversample=3.0, importance=0.75,
        temperature=0.07,
        # The class loss is normalised per group of this many images, then averaged: the
        # reference normalises per GPU (2 images each) and DDP averages the GPUs. 0 = one
        # normaliser over the whole (micro-)batch.
        cls_norm_images=2)
    return m


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
        lr=1e-4, min_lr=1e-6, weight_decay=vlm_spec(args.vlm).config.weight_decay,
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
