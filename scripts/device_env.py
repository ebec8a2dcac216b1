#!/usr/bin/env python
"""What the machine has, before anything imports it: Python, JAX and its devices, and the
packages mfuser-jax uses, each present (with its version) or absent. Run first by
scripts/gpu_check.sh, so that a device image without a package says so instead of crashing.

    python scripts/device_env.py [--wheels .whl --target DIR]

``--wheels DIR`` first installs (pip, offline, no dependencies) every wheel in DIR whose
top-level modules are not importable, into ``--target``; the caller puts that folder on
PYTHONPATH. scripts/fetch_wheels.sh downloads such wheels on a machine with network.
Exit status: 0, or 3 when a package the model needs is absent (named in the last line).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
import zipfile

# import name -> what needs it. REQUIRED: the model, the scan and every benchmark section;
# the others only some steps (reported, not fatal).
REQUIRED = {"jax": "everything", "flax": "the model", "chex": "the model", "numpy": "everything"}
OPTIONAL = {"optax": "the train_step section and training", "orbax.checkpoint": "checkpoints in training",
            "torch": "the scan tests (float64 reference)", "pytest": "the scan tests",
            "ml_collections": "configs/ (the train_step section, training and evaluation scripts)",
            "grain": "the data pipeline", "tensorflow_datasets": "nothing in the check (data preparation only)"}


def module_version(name: str, *, load: bool) -> str | None:
    """The module's version ('present' when it has none), or None if it is not installed.
    ``load``: import it (a broken install then reads 'broken (...)'); else only find it and read
    the installed distribution's version, which keeps heavy optional packages unimported."""
    top = name.split(".")[0]
    try:
        if importlib.util.find_spec(name if load else top) is None:
            return None
    except ImportError:
        return None
    if not load:
        dists = importlib.metadata.packages_distributions().get(top, [])
        for dist in dists:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        return "present"
    try:
        module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a broken install is reported with its reason
        return f"broken ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return str(getattr(module, "__version__", None) or getattr(sys.modules[top], "__version__", "present"))


def wheel_modules(path: str) -> list[str]:
    """Top-level import names a wheel provides (top_level.txt, else its top-level folders)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        tops = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if tops:
            return [m.strip() for m in z.read(tops[0]).decode().splitlines() if m.strip()]
        found = {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n and ".data/" not in n}
        found |= {n[:-3] for n in names if "/" not in n and n.endswith(".py")}
        return sorted(found)


def install_missing_wheels(folder: str, target: str) -> list[str]:
    """pip-install (offline, no deps) the wheels in ``folder`` whose modules are missing; one line
    of report each."""
    report = []
    for wheel in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        mods = wheel_modules(wheel)
        if mods and all(importlib.util.find_spec(m) is not None for m in mods):
            report.append(f"wheel {os.path.basename(wheel)}: not needed ({', '.join(mods)} present)")
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--target", target, wheel]
        done = subprocess.run(cmd, capture_output=True, text=True)
        tail = (done.stderr.strip().splitlines() or [""])[-1]
        report.append(f"wheel {os.path.basename(wheel)}: " + ("installed" if done.returncode == 0 else f"FAILED: {tail}"))
    if report:
        sys.path.insert(0, target)
        importlib.invalidate_caches()
    return report


def report(required=REQUIRED, optional=OPTIONAL) -> tuple[list[str], list[str]]:
    """(lines to print, missing required modules)."""
    lines = [f"python {platform.python_version()} ({sys.executable})"]
    missing = []
    for table, needed in ((required, True), (optional, False)):
        for name, why in table.items():
            version = module_version(name, load=needed)
            if version is None or version.startswith("broken"):
                lines.append(f"{name}: {'MISSING' if needed else 'absent'}{'' if version is None else ' ' + version}"
                             f" (needed by {why})")
                if needed:
                    missing.append(name)
            else:
                lines.append(f"{name} {version}")
    if "jax" not in missing:
        import jax

        try:
            devices = jax.devices()
            lines.append(f"backend {jax.default_backend()}, devices {devices}")
            cc = getattr(devices[0], "compute_capability", None)
            if cc is not None:
                lines.append(f"compute capability {cc}")
        except Exception as e:  # noqa: BLE001 - a JAX that cannot start its backend
            lines.append(f"jax backend failed: {type(e).__name__}: {e}")
            missing.append("a working jax backend")
    return lines, missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help="folder of wheels to install where their modules are missing")
    parser.add_argument("--target", default="/tmp/mfuser_site", help="install folder for --wheels")
    args = parser.parse_args(argv)
    if args.wheels and os.path.isdir(args.wheels):
        for line in install_missing_wheels(args.wheels, args.target):
            print(line)
    lines, missing = report()
    print("\n".join(lines))
    if missing:
        print(f"missing required: {', '.join(missing)}; carry the wheels in .whl/ (scripts/fetch_wheels.sh)")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
