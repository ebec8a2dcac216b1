"""The full-size programs lowered for CUDA on this CPU machine (nothing compiles): every
variant's train step holds the selective scan's Triton kernels forward and backward and no
(batch, length, channels, state) tensor, matmuls in bfloat16 where the model computes in it;
the sliding-window evaluation step lowers; over an 8-device abstract mesh the step's arguments
carry the shardings of mfuser_jax/sharding.py. One lowering per variant, shared by its tests.
What this cannot catch (Triton compile errors, cuDNN's limits, memory, speed) needs a GPU."""

import math
import os
import sys

import pytest

from configs import gta2cs
from mfuser_jax.run import lowering as lw
from mfuser_jax import sharding as shd
from mfuser_jax.errors import UserError
from tests.support import REPO

FORWARD = {"_chunk_state_kernel", "_carry_kernel", "_chunk_output_kernel"}
BACKWARD = {"_chunk_adjoint_kernel", "_chunk_grad_kernel"}
D_SCAN, N_STATE = 512, 16  # MVFuser-L's scanned channels (d_inner / 2) and state size
# Fused sequence length of the full-size MVFusers: both towers' tokens at 512 px.
LENGTH = {"clip": 2 * (32 * 32 + 1), "eva02": 2 * (36 * 36 + 1), "siglip": (32 * 32 + 1) + 32 * 32}
# One lowering per variant, and between them the settings that matter: the paper's float32
# recipe; small_gpu (bfloat16, two micro-batches); bfloat16 over 8 abstract devices with the
# frozen towers split (FSDP), at a global batch of 8 so that the batch splits.
SETTINGS = {
    "clip": dict(arg="vlm=clip", devices=None),
    "eva02": dict(arg="vlm=eva02,small_gpu=True", devices=None),
    "siglip": dict(arg="vlm=siglip", devices=8, dtype="bfloat16", batch_size=8,
                   fsdp_min_size=2**20),
}


def _config(variant):
    s = SETTINGS[variant]
    config = gta2cs.get_config(s["arg"])
    config.model.pretrained = ""
    if "dtype" in s:
        config.model.dtype = s["dtype"]
    if "batch_size" in s:
        config.batch_size = s["batch_size"]
    if "fsdp_min_size" in s:
        config.sharding.fsdp_min_size = s["fsdp_min_size"]
    return config


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def lowered(request, tmp_path_factory):
    variant = request.param
    config = _config(variant)
    if variant == "siglip":  # its class names need a SentencePiece vocabulary
        config.model.siglip.tokenizer = request.getfixturevalue("spiece")
    devices = SETTINGS[variant]["devices"]
    if devices is None:  # through the job behind --compile_only --platform=cuda --lowered_out
        out = tmp_path_factory.mktemp("lowered") / "step.mlir"
        lines = []
        lw.lower_train_step_job(config, "cuda", str(out), log=lines.append)
        return variant, config, out.read_text(), lines
    low, _, _ = lw.lower_train_step(config, "cuda", num_devices=devices)
    # With debug info the main function's arguments carry their names (sharding check).
    return variant, config, low.as_text(debug_info=True), None


def test_train_step_holds_the_scan_kernels_forward_and_backward(lowered):
    _, _, text, _ = lowered
    _, kernels = lw.custom_calls(text)
    assert set(kernels) == FORWARD | BACKWARD, kernels
    # remat recomputes the fused layers' forward in the backward: forward kernels twice there
    assert kernels["_chunk_state_kernel"] >= 2 and kernels["_chunk_grad_kernel"] >= 2


def test_no_batch_length_channel_state_tensor(lowered):
    variant, config, text, _ = lowered
    length = LENGTH[variant]
    types = lw.tensor_types(text)
    micro = int(config.batch_size) // int(config.optim.get("grad_accum", 1))
    # the scan's own inputs are there, (batch, channels, length): the check below is not moot
    assert any(s[1:] == (D_SCAN, length) and s[0] in (micro, config.batch_size) for s, _ in types)
    offending = [s for s, _ in types
                 if len(s) >= 4 and {length, D_SCAN, N_STATE} <= set(s)]
    assert not offending, offending


def test_matmuls_follow_the_model_dtype(lowered):
    _, config, text, _ = lowered
    dots = lw.dot_flops(text)
    total = sum(f for _, f in dots.values())
    bf16 = dots.get("bf16", (0, 0))[1] / total
    if config.model.dtype == "bfloat16":
        # the towers, fusers and heads; float32 stays where the model asks for it (losses,
        # the score map, the text tower's final projection ...)
        assert bf16 > 0.9, dots
    else:
        assert bf16 == 0 and set(dots) == {"f32"}, dots


def test_eight_device_mesh_shardings(lowered):
    variant, config, text, _ = lowered
    if SETTINGS[variant]["devices"] is None:
        pytest.skip("lowered on this machine's mesh")
    args = lw.main_arg_shardings(text)
    fsdp = int(config.sharding.fsdp_min_size)
    seen = set()
    for name, shape, axes in args:
        kind = name.split("[")[0].split(".")[0]
        seen.add(kind)
        if kind in ("images", "labels"):  # the batch on 'data', the rest whole
            expected = ("data",) + (None,) * (len(shape) - 1)
        elif kind == "rest":  # frozen weights: FSDP above the size threshold
            expected = tuple(shd.fsdp_spec(shape, 8, fsdp)) if shape else ()
            expected += (None,) * (len(shape) - len(expected))
        else:  # trained params, batch statistics, optimizer state, step: replicated
            expected = (None,) * len(shape)
        got = tuple(a[0] if a else None for a in axes)
        assert got == expected, (name, shape, got, expected)
    assert {"params", "rest", "opt_state", "images", "labels"} <= seen, seen
    split = [a for a in args if a[0].startswith("rest") and any(a[2])]
    # the frozen towers (most of the 900M parameters) are split, not only a few arrays
    assert sum(math.prod(s) for _, s, _ in split) > 500e6, len(split)


def test_sliding_window_step_lowers(tmp_path):
    # through the job behind scripts/eval.py --lower_only --platform=cuda, at Cityscapes' size
    lines = []
    out = tmp_path / "eval.mlir"
    summary = lw.lower_eval_step_job(_config("clip"), "cuda", 1024, 2048, str(out), log=lines.append)
    assert len(lines) == 2 and lines[1].startswith("evaluation step for cuda"), lines
    assert set(summary["triton_kernels"]) == FORWARD  # inference: no backward kernels
    main = next(line for line in out.read_text().splitlines() if "func.func public @main(" in line)
    # the image's confusion matrix and its prediction (kept for eval.py --show_dir)
    assert main.rstrip(" {").endswith(
        '-> (tensor<19x19xi32> {jax.result_info = "result[0]"}, '
        'tensor<1024x2048xi32> {jax.result_info = "result[1]"})'), main[-200:]
    assert summary["dot_general"].keys() == {"f32"}
    with pytest.raises(UserError, match="must be positive"):
        lw.lower_eval_step_job(_config("clip"), "cuda", 0, 2048)


def test_cudnn_attention_is_refused_in_one_line_without_cudnn():
    import jax

    config = _config("clip")
    config.model.attn_implementation = "cudnn"
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU machine has cuDNN")
    with pytest.raises(UserError, match="cuDNN is installed"):
        lw.lower_train_step(config, "cuda")
    with pytest.raises(UserError, match="unknown platform 'gpu'"):
        lw.check_platform(_config("clip"), "gpu")


def test_job_writes_the_module_and_one_summary_line(lowered):
    variant, config, text, lines = lowered
    if lines is None:
        pytest.skip("lowered over an abstract mesh, not through the job")
    assert len(lines) == 2 and lines[1].startswith("train step for cuda"), lines
    assert lines[1].endswith(".mlir") and "_chunk_grad_kernel x2" in lines[1]
    assert f"module {len(text.encode()) / 2**20:.1f} MiB" in lines[1]
    dtype = "bf16" if config.model.dtype == "bfloat16" else "f32"
    assert f"dot_general by FLOPs: {dtype} " in lines[1] and "largest tensor " in lines[1]


def test_cli_mistake_is_one_line():
    import subprocess

    done = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/demo.py",
                           "--platform=cuda"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --platform goes with --compile_only (see --help)"
