"""Every CLI mistake is one short message with exit status 2 and no traceback; help exits 0;
a workdir refuses a config that builds another model than the one it holds."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO

SCRIPTS = ("train", "eval", "predict", "convert_weights", "export")


def _run(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script,flag", zip(SCRIPTS, ("--help", "-h", "--help", "-h", "--help")))
def test_help_exits_0(script, flag):
    out = _run(f"scripts/{script}.py", flag)
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("extra,needle", [
    (["--config", "configs/nope.py"], "error: config file not found: configs/nope.py"),
    (["--config", "{tmp}/syntax.py"], "error: syntax error in config file {tmp}/syntax.py "
                                      "line 2: '(' was never closed"),
    (["--config", "{tmp}/raises.py"], "error: config file {tmp}/raises.py line 4: "
                                      "NameError: name 'undefined_name' is not defined"),
    (["--config", "configs/demo.py", "--config.totl_steps=10"],
     "error: --config.totl_steps: config has no field 'totl_steps'; did you mean "
     "config.total_steps or config.profile_steps?"),
    (["--config", "configs/demo.py", "--config.model.dinov2.embd_dim=2"],
     "error: --config.model.dinov2.embd_dim: config.model.dinov2 has no field 'embd_dim'; "
     "did you mean config.model.dinov2.embed_dim?"),
    (["--config", "configs/demo.py", "--config.total_steps=ten"],
     "error: --config.total_steps=ten: invalid literal for int() with base 10: 'ten'"),
    (["--config", "configs/demo.py:vlm=llava"],
     "error: vlm='llava': choose one of ('clip', 'eva02', 'siglip')"),
    (["--config", "configs/demo.py:small_gpu=maybe"],
     "error: small_gpu='maybe': expected True or False"),
    (["--config", "configs/demo.py", "stray"], "error: unexpected argument 'stray'"),
    (["--config", "configs/demo.py", "--wrkdir=x"], "error: Unknown command line flag"),
    (["--workdir={tmp}/w"], "error: --config is required (see --help)"),
])
def test_config_and_flag_mistakes(tmp_path, extra, needle):
    tmp = str(tmp_path)
    (tmp_path / "syntax.py").write_text("def get_config():\n    return dict(a=(1,\n")
    (tmp_path / "raises.py").write_text(
        "from configs import base\n\ndef get_config(arg=None):\n    return undefined_name\n")
    args = [a.format(tmp=tmp) for a in extra]
    if not any(a.startswith("--workdir") for a in args):
        args += ["--workdir", f"{tmp}/w"]
    out = _run("scripts/train.py", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[0].startswith(needle.format(tmp=tmp)), out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2
    assert not os.path.exists(os.path.join(tmp, "w"))


def test_runs_from_another_folder(tmp_path):
    """The scripts find the package and configs/ from any working directory."""
    out = _run(os.path.join(REPO, "scripts", "eval.py"), "--config",
               os.path.join(REPO, "configs", "demo.py"), "--config.totl_steps=1", "--workdir",
               str(tmp_path), cwd=str(tmp_path))
    assert out.returncode == 2 and "did you mean config.total_steps" in out.stderr


def test_workdir_refuses_another_vlm(tmp_path):
    from configs import demo
    from mfuser_jax.workdir import write_config
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "600").mkdir(parents=True)
    write_config(str(workdir), demo.get_config())  # what training on demo.py (clip) writes
    out = _run("scripts/eval.py", "--config", "configs/demo.py:vlm=eva02", "--workdir",
               str(workdir))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        f"error: {workdir} holds a vlm='clip' model ({workdir}/config.json) but the config "
        "builds vlm='eva02': append ':vlm=clip' to the config file name (e.g. --config "
        "configs/gta2cs.py:vlm=clip)")


def test_vlm_override_without_its_section_is_refused():
    from configs import demo
    from mfuser_jax.run.train import UserError
    from mfuser_jax.workdir import check_model_config
    config = demo.get_config()
    check_model_config(config)
    config.model.vlm = "eva02"  # what --config.model.vlm=eva02 does: no eva02 settings
    with pytest.raises(UserError, match=r"no config.model.eva02 section: choose the tower "
                                        r"with the config argument"):
        check_model_config(config)
