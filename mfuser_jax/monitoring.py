"""What a run reports and listens to: metrics.jsonl and TensorBoard, the console's step
lines, a profiler trace of chosen steps, and the stop signals (SIGTERM, Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

import jax

from mfuser_jax.errors import UserError

class MetricWriter:
    """metrics.jsonl + TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, resume_step: int):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.active:
            return
        # Drop lines a killed run wrote after its last checkpoint: they are redone.
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            if len(keep) != len(lines):
                with open(self.path, "w") as f:
                    f.writelines(keep)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(workdir)
        except ImportError:
            self.tb = None

    def write(self, record: dict, prefix: str) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            tag = prefix + (f"/{record['dataset']}" if "dataset" in record else "")
            for k, v in record.items():
                if k not in ("step", "dataset") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{tag}/{k}", v, step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


CONSOLE_WIDTH = 120


def format_step_line(step: int, total: int, loss: float, lr: float,
                     images_per_s: float | None, eta_s: float | None) -> str:
    """'step   40/600 | loss  12.3456 | lr 1.00e-03 |   45.6 img/s | ETA 3m20s': fixed
    columns, well under CONSOLE_WIDTH; under one image per second (a CPU at full size) the
    rate is shown as seconds per image. No rate yet (None): the window held compilation."""
    n = len(str(total))
    if images_per_s is None:
        speed = "compiling (rate and ETA on the next line)"
    else:
        rate = (f"{images_per_s:7.1f} img/s" if images_per_s >= 1 or images_per_s <= 0
                else f"{1 / images_per_s:7.1f} s/img")
        speed = f"{rate} | ETA {_fmt_time(eta_s)}"
    return f"step {step:>{n}}/{total} | loss {loss:8.4f} | lr {lr:.2e} | {speed}"


def format_loss_parts(parts: dict[str, float], width: int = CONSOLE_WIDTH) -> str:
    """The per-part losses (config.log_parts), wrapped and indented under a step line."""
    import textwrap
    text = "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
    return textwrap.fill(text, width=width, initial_indent="    ", subsequent_indent="    ",
                         break_on_hyphens=False)


class StopSignals:
    """SIGTERM and Ctrl-C during training: finish the current step, save it, stop.

    The first signal only records itself; the loop checks after every step. A first Ctrl-C
    says so at once and restores the default handler, so a second one ends the process
    immediately. Ctrl-C during an evaluation abandons it (`evaluating`), so the checkpoint
    follows promptly; the resumed run evaluates that step again. Outside the main thread
    (no signals there) and for a SIGINT the parent ignores (background jobs), nothing is
    installed."""

    NOTICE = (b"\nCtrl-C: saving a checkpoint after the current step (Ctrl-C again quits "
              b"at once, without it)\n")

    def __init__(self):
        self.signum: int | None = None
        self.evaluating = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.write(2, self.NOTICE)  # not print(): the main thread may be inside one
            if self.evaluating:
                raise KeyboardInterrupt

    def evaluate(self, fn: Callable[[], Any]) -> None:
        """Runs an evaluation; a Ctrl-C during it abandons it (nothing half-written: the
        per-dataset JSON files are replaced atomically)."""
        self.evaluating = True
        try:
            fn()
        except KeyboardInterrupt:
            if self.signum is None:
                raise
        finally:
            self.evaluating = False

    def message(self, step: int, workdir: str) -> str:
        what = "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "SIGTERM"
        return (f"{what}: checkpoint of step {step} saved in {workdir}/checkpoints; "
                "rerun the same command to resume")



class StepProfiler:
    """A jax.profiler trace of the steps first..last (1-based) into `logdir`, which
    TensorBoard's profile plugin reads (tensorboard --logdir W)."""

    def __init__(self, steps: tuple[int, int] | None, logdir: str, log: Callable[[str], None]):
        self.steps, self.logdir, self.log, self.active = steps, logdir, log, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)  # the trace holds the steps' device work
            self.stop()
            self.log(f"profile of steps {self.steps[0]}-{self.steps[1]} in {self.logdir} "
                     f"(tensorboard --logdir {self.logdir})")

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def parse_profile_steps(config: Any) -> tuple[int, int] | None:
    """config.profile_steps "a,b" (or "a"): the steps a..b (1-based) to trace."""
    spec = str(config.get("profile_steps", "") or "").strip()
    if not spec:
        return None
    try:
        bounds = [int(x) for x in spec.split(",")]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or bounds[0] < 1 or bounds[-1] < bounds[0]:
        raise UserError(f"profile_steps={spec!r}: give 'a,b' with 1 <= a <= b (the steps to "
                        "trace) or 'a' for one step")
    return bounds[0], bounds[-1]
