"""Programs lowered for a platform this machine may not have (``--compile_only --platform``).

JAX lowers a jitted function for any platform (``.trace(...).lower(lowering_platforms=...)``)
without compiling it: on a CPU machine the train step and the sliding-window evaluation step
lower for "cuda" to the StableHLO a GPU would compile, with the selective scan's Pallas kernels
as Triton custom calls (the scan follows the lowering platform, ``ops/selective_scan.py``). The
module shows which kernels and custom calls a GPU gets, the tensor shapes, the matmul dtypes
and, over an abstract mesh (no devices needed), the shardings. It cannot show whether the
Triton kernels compile for a given GPU, what cuDNN accepts, memory use or speed: that needs the
device (``module_summary`` reads the text only).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax import sharding as shd
from mfuser_jax.errors import UserError

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax's lowering platforms
TRITON = "__gpu$xla.gpu.triton"

_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "ui64": 8, "i32": 4, "ui32": 4,
          "i16": 2, "ui16": 2, "i8": 1, "ui8": 1, "i1": 1}
_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z][a-z0-9]*)>")
# A Triton custom call carries its kernel as MLIR bytecode in ``ir = "..."`` (quotes inside are
# escaped as \22): dropped before reading types, which the bytecode must not contribute.
_IR_STRING = re.compile(r'\bir = "[^"]*"')
_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\]"
                  r".*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)")


def _tensor_type(t: str) -> tuple[tuple[int, ...], str]:
    m = _TENSOR.fullmatch(t)
    if m is None:
        return (), t
    return tuple(int(d) for d in m.group(1).split("x") if d), m.group(2)


def tensor_types(text: str) -> Counter:
    """{(shape, element type): occurrences} of every tensor type in a StableHLO module's text."""
    text = _IR_STRING.sub("", text)
    return Counter((tuple(int(d) for d in dims.split("x") if d), dtype)
                   for dims, dtype in _TENSOR.findall(text))


def dot_flops(text: str) -> dict[str, tuple[int, int]]:
    """{operand dtypes ("bf16", or "bf16 x f32" when they differ): (dot_general ops, FLOPs)}.
    FLOPs of one execution of each op as written (ops inside loops count once)."""
    out: dict[str, list[int]] = {}
    for line in _IR_STRING.sub("", text).splitlines():
        if "stablehlo.dot_general" not in line:
            continue
        m = _DOT.search(line)
        if m is None:
            continue
        contracting = [int(d) for d in m.group(1).replace(" ", "").split(",") if d]
        (lhs, lt), (_, rt), (res, _) = (_tensor_type(m.group(i)) for i in (2, 3, 4))
        key = lt if lt == rt else f"{lt} x {rt}"
        flops = 2 * math.prod(res) * math.prod(lhs[d] for d in contracting)
        entry = out.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += flops
    return {k: (n, f) for k, (n, f) in out.items()}


def custom_calls(text: str) -> tuple[Counter, Counter]:
    """({call target: count} of the other custom calls, {Triton kernel name: count})."""
    calls, kernels = Counter(), Counter()
    for line in text.splitlines():
        for target in re.findall(r"stablehlo\.custom_call @([\w$.\-]+)", line):
            if target == TRITON:
                name = re.search(r'\bname = "([^"]*)"', _IR_STRING.sub("", line))
                kernels[name.group(1) if name else "?"] += 1
            else:
                calls[target] += 1
    return calls, kernels


def main_arg_shardings(text: str) -> list[tuple[str, tuple[int, ...], list[tuple[str, ...]]]]:
    """(name, shape, mesh axes per dimension) of each argument of the module's main function,
    from its Shardy annotations (none: replicated). Names (the jitted function's argument
    paths, e.g. "params['backbone']...") need the text with debug info, else they are ""."""
    start = text.index("func.func public @main(")
    sig = text[start:text.index("\n", start)]
    out = []
    for arg in re.split(r"%arg\d+: ", sig)[1:]:
        shape, _ = _tensor_type(re.match(r"tensor<[^>]*>", arg).group(0))
        m = re.search(r"#sdy\.sharding<@\w+, \[(.*?)\]>", arg)
        dims = re.findall(r"\{([^}]*)\}", m.group(1)) if m else [""] * len(shape)
        name = re.search(r'loc\("([^"]*)"\)', arg)
        out.append((name.group(1) if name else "", shape,
                    [tuple(re.findall(r'"(\w+)"', d)) for d in dims]))
    return out


def module_summary(text: str) -> dict[str, Any]:
    types = tensor_types(text)
    (shape, dtype) = max(types, key=lambda k: math.prod(k[0]) * _BYTES.get(k[1], 4))
    calls, kernels = custom_calls(text)
    return dict(module_bytes=len(text.encode()), triton_kernels=dict(kernels),
                custom_calls=dict(calls), largest_tensor=(shape, dtype),
                largest_tensor_bytes=math.prod(shape) * _BYTES.get(dtype, 4),
                dot_general=dot_flops(text))


def format_summary(s: dict[str, Any]) -> str:
    """One line: module size, Triton kernels and other custom calls by name, the largest
    tensor, the dot_general dtypes with their share of the matmul FLOPs."""
    def counted(d):
        return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"

    shape, dtype = s["largest_tensor"]
    total = sum(f for _, f in s["dot_general"].values()) or 1
    dots = ", ".join(f"{k} {n} ops {100 * f / total:.1f}%" for k, (n, f) in
                     sorted(s["dot_general"].items(), key=lambda kv: -kv[1][1])) or "none"
    return (f"module {s['module_bytes'] / 2**20:.1f} MiB; Triton kernels: "
            f"{counted(s['triton_kernels'])}; other custom calls: {counted(s['custom_calls'])}; "
            f"largest tensor {'x'.join(map(str, shape))} {dtype} "
            f"({s['largest_tensor_bytes'] / 2**20:.0f} MiB); dot_general by FLOPs: {dots}")


def check_platform(config: Any, platform: str) -> None:
    """Refuses, in one line, lowerings that cannot work on this machine."""
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}: choose from {', '.join(PLATFORMS)}")
    if (config.model.get("attn_implementation", None) == "cudnn"
            and jax.default_backend() != "gpu"):
        raise UserError("model.attn_implementation=cudnn lowers only where cuDNN is installed "
                        "(JAX asks its version while tracing): lower with "
                        "--config.model.attn_implementation=xla here, or on a GPU machine")


def _mesh(config: Any, num_devices: int | None):
    if num_devices is None:
        return shd.make_mesh(config.get("mesh", None))
    return shd.abstract_mesh(config.get("mesh", None), num_devices)


def _abstract_model(config: Any):
    from mfuser_jax.model.factory import build_model
    return nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(int(config.seed))))


def lower_train_step(config: Any, platform: str, *, num_devices: int | None = None):
    """The Trainer's train step at the config's batch and crop size, model built from shapes,
    lowered for ``platform`` (on ``num_devices`` abstract devices when given, else this
    machine's mesh) -> (jax ``Lowered``, the Trainer, seconds (build, trace+lower))."""
    from mfuser_jax.process import apply_matmul_precision
    from mfuser_jax.trainer import Trainer

    check_platform(config, platform)
    apply_matmul_precision(config)
    mesh = _mesh(config, num_devices)
    if int(config.batch_size) % mesh.shape[shd.DATA_AXIS]:
        raise UserError(f"batch_size {config.batch_size} does not split over the "
                        f"{mesh.shape[shd.DATA_AXIS]} devices of the mesh's data axis")
    t0 = time.perf_counter()
    trainer = Trainer(config, _abstract_model(config), mesh)
    t1 = time.perf_counter()
    lowered = trainer.lower(int(config.batch_size), int(config.data.crop_size),
                            platforms=(platform,))
    return lowered, trainer, (t1 - t0, time.perf_counter() - t1)


def lower_eval_step(config: Any, platform: str, height: int, width: int):
    """The evaluator's per-image step (sliding window of config.evaluation over a
    height x width uint8 image, scores resized to the label, argmax, confusion matrix), model
    built from shapes, lowered for ``platform`` -> jax ``Lowered``."""
    from mfuser_jax.run.evaluate import ImageEvaluator
    from mfuser_jax.process import apply_matmul_precision

    check_platform(config, platform)
    apply_matmul_precision(config)
    ev = config.evaluation
    evaluator = ImageEvaluator(_abstract_model(config), num_classes=int(config.model.num_classes),
                               crop=int(ev.crop_size), stride=int(ev.stride),
                               crop_batch=int(ev.crop_batch))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), evaluator.state)
    image = jax.ShapeDtypeStruct((1, height, width, 3), jnp.uint8)
    label = jax.ShapeDtypeStruct((1, height, width), jnp.int32)
    return evaluator._run.trace(state, image, label).lower(lowering_platforms=(platform,))


def report_lowered(what: str, lowered, out: str | None, log: Callable[[str], None]) -> dict:
    """Writes the StableHLO text to ``out`` (when given) and logs the one-line summary."""
    from mfuser_jax.files import atomic_write

    text = lowered.as_text()
    summary = module_summary(text)
    if out:
        with atomic_write(out) as (tmp,):
            with open(tmp, "w") as f:
                f.write(text)
    log(f"{what}: {format_summary(summary)}" + (f"; written to {out}" if out else ""))
    return summary


def lower_train_step_job(config: Any, platform: str, out: str | None = None,
                         num_devices: int | None = None,
                         log: Callable[[str], None] = print) -> dict:
    """``scripts/train.py --compile_only --platform P``: the train step lowered for P, no
    compile; the StableHLO text to ``out``; one summary line. Returns the summary."""
    check_platform(config, platform)
    devices = "this machine's mesh" if num_devices is None else f"{num_devices} devices"
    log(f"lowering the train step for {platform} ({devices}) at batch {config.batch_size}, "
        f"{config.data.crop_size} px, model built from shapes ...")
    lowered, trainer, (build_s, lower_s) = lower_train_step(config, platform,
                                                            num_devices=num_devices)
    summary = report_lowered(f"train step for {platform} (built {build_s:.1f} s, traced and "
                             f"lowered {lower_s:.1f} s)", lowered, out, log)
    return {**summary, "build_s": build_s, "lower_s": lower_s}


def lower_eval_step_job(config: Any, platform: str, height: int, width: int,
                        out: str | None = None, log: Callable[[str], None] = print) -> dict:
    """``scripts/eval.py --lower_only --platform P``: the sliding-window evaluation of one
    height x width image lowered for P, no compile, no checkpoint; as ``lower_train_step_job``."""
    if height < 1 or width < 1:
        raise UserError(f"--height and --width must be positive, got {height}x{width}")
    check_platform(config, platform)
    ev = config.evaluation
    log(f"lowering the evaluation step for {platform}: one {height}x{width} image, windows "
        f"{ev.crop_size} px, stride {ev.stride}, {ev.crop_batch} per batch ...")
    t0 = time.perf_counter()
    lowered = lower_eval_step(config, platform, height, width)
    return report_lowered(f"evaluation step for {platform} (built, traced and lowered "
                          f"{time.perf_counter() - t0:.1f} s)", lowered, out, log)
