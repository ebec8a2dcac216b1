#!/usr/bin/env python
"""The selective scan's Triton kernels without a GPU: their IR, and what a GPU compiler makes
of it (registers, shared memory, spills) for sm_80 and sm_90.

    python scripts/triton_kernels.py dump --out K [--dtype float32,bfloat16]
    PYTHON_WITH_TRITON scripts/triton_kernels.py compile --out K [--arch 80,90]

``dump`` (needs jax): lowers the fused scan, forward and backward, at the paper shape
(B8 D512 L2050 N16) for cuda and writes each kernel's Triton IR as text (K/<dtype>_<kernel>.ttir,
read from the MLIR bytecode in the custom call with jaxlib's Triton dialect) and K/kernels.json.
``compile`` (needs the ``triton`` package, no jax, no GPU): compiles each .ttir for the given
architectures with Triton's own pipeline and ptxas, and prints registers, static and launch
shared memory, stack and local (spill) memory per kernel, from cuobjdump. Triton's pipeline is
not XLA's (jaxlib carries its own Triton), so these are estimates of what the GPU build does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys


def dump(out: str, dtypes: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import importlib

    import jax
    import jax.numpy as jnp
    from jaxlib.mlir import ir
    from jaxlib.triton import dialect

    ssp = importlib.import_module("mfuser_jax.ops.selective_scan_pallas")
    b, d, l, n = 8, 512, 2050, 16
    os.makedirs(out, exist_ok=True)
    kernels = []
    for name in dtypes:
        dtype = jnp.dtype(name)
        sd = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
        args = (sd(b, d, l), sd(b, d, l), sd(d, n), sd(b, n, l), sd(b, n, l), sd(d), sd(b, d, l), sd(d))
        fwd = lambda *a: ssp.pallas_selective_scan(*a, True, interpret=False)  # noqa: E731
        grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=tuple(range(8)))
        module = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")

        def ops(op):
            for region in op.regions:
                for block in region.blocks:
                    for o in block.operations:
                        yield o
                        yield from ops(o)

        for op in ops(module.operation):
            if op.name != "stablehlo.custom_call" or "triton" not in str(op.attributes["call_target_name"]):
                continue
            config = op.attributes["mhlo.backend_config"]
            value = lambda key: int(str(config[key]).split(":")[0])  # noqa: E731
            kernel = str(config["name"]).strip('"')
            seen = sum(k["kernel"] == kernel and k["dtype"] == name for k in kernels)
            label = kernel + ("_reverse" if seen else "")  # _carry_kernel runs both ways
            context = ir.Context()
            dialect.register_dialect(context)
            with context:
                text = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(enable_debug_info=False)
            path = os.path.join(out, f"{name}_{label}.ttir")
            with open(path, "w") as f:
                f.write(text)
            kernels.append(dict(kernel=kernel, label=label, dtype=name, ttir=os.path.basename(path),
                                num_warps=value("num_warps"), num_stages=value("num_stages"),
                                grid=[value(k) for k in ("grid_x", "grid_y", "grid_z")]))
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump(dict(shape=dict(batch=b, dim=d, length=l, state=n), kernels=kernels), f, indent=1)
    print(f"{len(kernels)} kernels written to {out}")


def compile_all(out: str, archs: list[int]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with open(os.path.join(out, "kernels.json")) as f:
        kernels = json.load(f)["kernels"]
    print(f"triton {triton.__version__}; REG registers per thread, SHARED static / launch bytes, "
          "STACK and LOCAL bytes per thread (LOCAL > 0: spills)")
    for k in kernels:
        for arch in archs:
            try:
                compiled = triton.compile(os.path.join(out, k["ttir"]), target=GPUTarget("cuda", arch, 32),
                                          options=dict(num_warps=k["num_warps"], num_stages=k["num_stages"]))
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                print(f"{k['dtype']:8} {k['label']:24} sm_{arch}: FAILED {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200]}")
                continue
            cubin = os.path.join(out, f"{k['dtype']}_{k['label']}.sm{arch}.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True,
                                   text=True).stdout
            res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
            print(f"{k['dtype']:8} {k['label']:24} sm_{arch}: REG {res.get('REG')} SHARED "
                  f"{res.get('SHARED')} / {compiled.metadata.shared} STACK {res.get('STACK')} "
                  f"LOCAL {res.get('LOCAL')}  (warps {k['num_warps']}, grid {k['grid']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("dump", "compile"))
    parser.add_argument("--out", required=True, help="folder of the .ttir files and kernels.json")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    args = parser.parse_args()
    if args.step == "dump":
        dump(args.out, args.dtype.split(","))
    else:
        compile_all(args.out, [int(a) for a in args.arch.split(",")])


if __name__ == "__main__":
    main()
