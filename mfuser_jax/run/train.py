"""The jobs behind scripts/train.py: train (resuming from W/checkpoints) and compile the
train step only. Restoring a workdir's model is run/restore.py's (prediction and export
use it without this module), evaluating a checkpoint run/evaluate.py's.

The pieces live beside it: data/checks.py (the data folders), process.py (JAX settings),
run/restore.py (building the model with its frozen weights),
trainer.py (the train state and the jitted step), optim.py (schedule and AdamW),
checkpoints.py (the Orbax formats) and monitoring.py (metrics, step lines, signals).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from mfuser_jax import sharding as shd
from mfuser_jax.checkpoints import (checkpoint_manager, restore_for_training, resume_step,
                                    save_checkpoint)
from mfuser_jax.errors import Preempted, TrainingDiverged, UserError
from mfuser_jax.run.evaluate import eval_json_path, evaluate_model
from mfuser_jax.model.factory import build_model
from mfuser_jax.monitoring import (MetricWriter, StepProfiler, StopSignals, format_loss_parts,
                                   format_step_line, parse_profile_steps)
from mfuser_jax.data.checks import available_eval_datasets, check_data
from mfuser_jax.model.factory import check_pretrained
from mfuser_jax.process import apply_matmul_precision, use_compile_cache
from mfuser_jax.run.restore import build_and_load
from mfuser_jax.towers.registry import get_vlm, vlm_names
from mfuser_jax.trainer import Trainer
from mfuser_jax.workdir import check_workdir_model, write_config


def _default_train_iter(config, *, start_step, process_index, process_count):
    from mfuser_jax.data.pipeline import make_train_iterator
    return make_train_iterator(config, start_step=start_step, process_index=process_index,
                               process_count=process_count)


def _eval_done(workdir: str, datasets: list[str], step: int) -> bool:
    return all(os.path.exists(eval_json_path(workdir, d, step)) for d in datasets)


BEST_DIR = "best"
BEST_METRICS = ("miou", "macc", "aacc")


def parse_save_best(config: Any, eval_sets: list[str]) -> tuple[str, str] | None:
    """config.save_best: "" (off), "miou", "macc" or "aacc", optionally ":<dataset>" (one
    of the evaluated datasets; default the first) or ":average" (over all of them)."""
    spec = str(config.get("save_best", "") or "").strip()
    if not spec:
        return None
    metric, _, dataset = spec.partition(":")
    if metric not in BEST_METRICS:
        raise UserError(f"save_best={spec!r}: the metric is one of {', '.join(BEST_METRICS)} "
                        "(optionally ':<dataset>' or ':average')")
    if not eval_sets:
        raise UserError(f"save_best={spec!r} needs an evaluation dataset (config.data.eval)")
    dataset = dataset or eval_sets[0]
    if dataset != "average" and dataset not in eval_sets:
        raise UserError(f"save_best={spec!r}: {dataset!r} is not evaluated (evaluated: "
                        f"{', '.join(eval_sets)}; or ':average')")
    return metric, dataset


class BestCheckpoint:
    """W/best: the model checkpoint (parameters and batch statistics) of the evaluation
    with the highest config.save_best metric so far, beside the last training checkpoints
    (mmseg's save_best). It is a workdir of its own (W/best/checkpoints/<step>,
    W/best/config.json, W/best/best.json with the metric, value and step), so
    `scripts/eval.py --workdir W/best` and predict.py use it as they are."""

    def __init__(self, config: Any, workdir: str, metric: str, dataset: str,
                 log: Callable[[str], None]):
        import json
        self.config, self.metric, self.dataset, self.log = config, metric, dataset, log
        self.dir = os.path.join(workdir, BEST_DIR)
        self.spec = f"{metric}:{dataset}"
        self.mngr = None  # opened at the first save: a run that fails first leaves no W/best
        self.value = None
        try:
            with open(os.path.join(self.dir, "best.json")) as f:
                info = json.load(f)
            if info.get("metric") == self.spec:
                self.value = float(info["value"])
        except (OSError, ValueError, KeyError):
            pass
        self.workdir = workdir

    def update(self, step: int, metrics: dict, state) -> None:
        import json

        from mfuser_jax.checkpoints import save_model_checkpoint
        from mfuser_jax.files import atomic_write
        values = ([m[self.metric] for m in metrics.values()] if self.dataset == "average"
                  else [metrics[self.dataset][self.metric]])
        value = float(np.mean(values))
        if not np.isfinite(value) or (self.value is not None and value <= self.value):
            return
        if self.mngr is None:
            self.mngr = checkpoint_manager(self.dir, 1)
        if step not in self.mngr.all_steps():
            save_model_checkpoint(self.mngr, step, state.params, state.batch_stats)
            self.mngr.wait_until_finished()
        if jax.process_index() == 0:
            own = os.path.join(self.workdir, "pretrained")  # a fine-tuned release's towers
            link = os.path.join(self.dir, "pretrained")
            if os.path.isdir(own) and not os.path.lexists(link):
                os.symlink(os.path.join("..", "pretrained"), link)
            write_config(self.dir, self.config)
            with atomic_write(os.path.join(self.dir, "best.json")) as (tmp,), \
                    open(tmp, "w") as f:
                json.dump({"metric": self.spec, "value": value, "step": int(step)}, f)
        self.value = value
        self.log(f"best {self.spec} so far: {value:.2f} at step {step}, saved in {self.dir}")

    def close(self) -> None:
        if self.mngr is not None:
            self.mngr.close()


def _latest_on_disk(workdir: str) -> int | None:
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps) if steps else None


def check_schedule_unchanged(config: Any, workdir: str, new_schedule: bool = False,
                             log: Callable[[str], None] = print) -> None:
    """Resuming with another total_steps than W/config.json's silently moved the poly
    learning-rate curve (a finished 600-step run raised to 620: lr 1.3e-5 at step 600,
    then 1.5e-4): refused unless `new_schedule`, which continues on the new curve."""
    from mfuser_jax.optim import lr_schedule
    from mfuser_jax.workdir import read_saved_config
    saved = (read_saved_config(workdir) or {}).get("total_steps")
    latest = _latest_on_disk(workdir)
    total = int(config.total_steps)
    if saved is None or not latest or int(saved) == total or latest >= total:
        return
    old = float(lr_schedule(config.optim, int(saved))(latest))
    new = float(lr_schedule(config.optim, total)(latest))
    what = (f"{workdir} was trained with total_steps={saved} (checkpoint at step {latest}); "
            f"the poly learning-rate schedule is a function of total_steps, so with "
            f"total_steps={total} the lr at step {latest} is {new:.2e} instead of {old:.2e}")
    if not new_schedule:
        raise UserError(f"{what}: pass --config.total_steps={saved} to resume the run as it "
                        "was, or --new_schedule to continue on the new schedule")
    log(f"note: {what} (--new_schedule)")


def train_and_evaluate(config: Any, workdir: str, *,
                       train_iter_fn: Callable[..., Iterator[dict]] | None = None,
                       eval_iter_fn: Callable[..., Any] | None = None,
                       log: Callable[[str], None] | None = None,
                       new_schedule: bool = False) -> dict:
    """Trains (resuming from W/checkpoints if present), evaluates, returns the last metrics.

    `train_iter_fn` / `eval_iter_fn` replace the data pipeline's iterator factories
    (same signatures as mfuser_jax.data.pipeline.make_train_iterator / make_eval_iterator).
    `new_schedule`: resume with another total_steps than the run was started with (the
    learning-rate curve moves; see check_schedule_unchanged).
    """
    shd.maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    log = log or (lambda s: print(s, flush=True) if is_main else None)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    total_steps = int(config.total_steps)
    check_data(config)
    check_pretrained(config)
    check_workdir_model(config, workdir)  # before config.json records this config
    check_schedule_unchanged(config, workdir, new_schedule, log)
    profile = parse_profile_steps(config)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        write_config(workdir, config)
    use_compile_cache(config, workdir)
    eval_sets = available_eval_datasets(config, log)

    best_spec = parse_save_best(config, eval_sets)
    mngr = checkpoint_manager(workdir, int(config.get("keep_checkpoints", 2)), log=log)
    try:
        latest = resume_step(mngr)  # damaged checkpoints are set aside, one line each
        if latest is not None and latest >= total_steps and _eval_done(workdir, eval_sets,
                                                                        latest):
            log(f"{workdir}: training already finished at step {latest}; nothing to do")
            mngr.close()
            return {"step": latest}

        mesh = shd.make_mesh(config.get("mesh", None))
        # A resume takes the trained state from the checkpoint (there is no fresh start once
        # a checkpoint exists: resume_step refuses when none can be read), so it is not
        # drawn from the initialisers first; the model keeps only its shapes, and training
        # and evaluation read the restored TrainState.
        model = build_and_load(config, workdir, skip_checkpointed=latest is not None)
        trainer = Trainer(config, model, mesh)
        best = BestCheckpoint(config, workdir, *best_spec, log) if best_spec else None
        n_train, n_all = trainer.num_params()
        log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
            f"{jax.process_count()} process(es); params: {n_train:,} trainable of {n_all:,}")
        if latest is not None:
            state, latest = restore_for_training(mngr, trainer, latest)
            log(f"resumed from {workdir}/checkpoints/{latest}")
        else:
            state = trainer.init_state()
    except BaseException:
        mngr.close()
        raise
    if state.step < total_steps:
        check_trainable_from(model)

    writer = MetricWriter(workdir, state.step)
    train_iter_fn = train_iter_fn or _default_train_iter
    batches = iter(train_iter_fn(config, start_step=state.step,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()))
    log_every = max(int(config.log_every), 1)
    ckpt_every = max(int(config.checkpoint_every), 1)
    eval_every = max(int(config.eval_every), 1)
    batch_size = int(config.batch_size)
    log_parts = bool(config.get("log_parts", False))

    pending: list[tuple[int, dict]] = []
    last: dict = {"step": state.step}
    t_window, n_window, warmed_up = time.time(), 0, False

    def flush():
        """Fetches pending step metrics; stops on a non-finite step; logs the window mean."""
        nonlocal t_window, n_window, last, warmed_up
        if not pending:
            return
        fetched = [(s, {k: float(shd.to_host(v)) for k, v in m.items()}) for s, m in pending]
        pending.clear()
        bad = [s for s, m in fetched if not m["finite"]]
        if bad:
            raise TrainingDiverged(
                f"non-finite loss or gradient in step {bad[0] + 1}: training stopped; the "
                f"last good checkpoint in {workdir}/checkpoints is kept (lower "
                "optim.lr, enable optim.grad_clip or use float32 compute)")
        end = fetched[-1][0] + 1
        keys = [k for k in fetched[-1][1] if k != "finite"]
        mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}
        lr = float(trainer.schedule(end - 1))
        record = {"step": end, **mean, "lr": lr}
        writer.write(record, "train")
        dt = time.time() - t_window
        # The first window after (re)start holds the step's compilation: no rate from it.
        ips = n_window * batch_size / max(dt, 1e-9) if warmed_up else None
        eta = (total_steps - end) * dt / max(n_window, 1)
        log(format_step_line(end, total_steps, mean["loss"], lr, ips, eta))
        if log_parts:
            log(format_loss_parts({k: v for k, v in mean.items() if k != "loss"}))
        t_window, n_window, warmed_up = time.time(), 0, True
        last = record

    def evaluate(step):
        model_now = trainer.merged_model(state)
        metrics: dict = {}
        res = evaluate_model(model_now, config, step=step, workdir=workdir,
                             datasets=eval_sets, eval_iter_fn=eval_iter_fn, log=log,
                             mesh=mesh, metrics_out=metrics)
        for name, miou in res.items():
            writer.write({"step": step, "dataset": name, "miou": miou}, "eval")
        if best is not None:
            best.update(step, metrics, state)
        return res

    def eval_due(step):
        return step % eval_every == 0 or step == total_steps

    profiler = StepProfiler(profile, os.path.join(workdir, "profile"), log)
    try:
        with StopSignals() as stop:
            if latest is not None and eval_due(latest) and not _eval_done(
                    workdir, eval_sets, latest):
                # a run stopped before (or while) evaluating its last checkpoint
                stop.evaluate(lambda: evaluate(latest))
            while state.step < total_steps and stop.signum is None:
                batch = next(batches)
                step_idx = state.step
                profiler.before(step_idx + 1)
                state, metrics = trainer.step(state, batch)
                profiler.after(step_idx + 1, metrics)
                pending.append((step_idx, metrics))
                n_window += 1
                done = state.step
                if done % log_every == 0 or done == total_steps:
                    flush()
                if done % ckpt_every == 0 or done == total_steps or stop.signum:
                    flush()
                    save_checkpoint(mngr, state)
                if eval_due(done) and stop.signum is None:
                    flush()
                    mngr.wait_until_finished()
                    stop.evaluate(lambda: evaluate(done))
                    if stop.signum and done % ckpt_every and done != total_steps:
                        save_checkpoint(mngr, state)  # stopped during an unsaved step's eval
                    t_window = time.time()  # keep evaluation out of the images/s figure
            mngr.wait_until_finished()
            if stop.signum is not None:
                raise Preempted(stop.message(state.step, workdir), stop.signum)
    finally:
        profiler.stop()
        mngr.close()
        writer.close()
        if best is not None:
            best.close()
    return last


def compile_train_step(config: Any, workdir: str | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Build the model from shapes only, then lower and compile the train step at the
    config's global batch and crop size: no data, no weights, no device memory for them.
    With a workdir, the compiled step goes into its compile cache (config.compile_cache), so
    training there starts without compiling. Returns times (s) and XLA's memory analysis
    (bytes per device)."""
    apply_matmul_precision(config)
    use_compile_cache(config, workdir)
    mesh = shd.make_mesh(config.get("mesh", None))
    t0 = time.perf_counter()
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(int(config.seed))))
    trainer = Trainer(config, model, mesh)
    t1 = time.perf_counter()
    n_train, n_all = trainer.num_params()
    log(f"model: {n_all:,} parameters, {n_train:,} trainable (built from shapes in "
        f"{t1 - t0:.1f} s); compiling the train step for batch {config.batch_size} "
        f"at {config.data.crop_size} px ...")
    lowered = trainer.lower(int(config.batch_size), int(config.data.crop_size))
    t2 = time.perf_counter()
    hits = []
    on_event = lambda event, **kw: hits.append(event)  # noqa: E731
    jax.monitoring.register_event_listener(on_event)
    try:
        compiled = lowered.compile()
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    t3 = time.perf_counter()
    mem = compiled.memory_analysis()
    report = dict(build_s=t1 - t0, trace_s=t2 - t1, compile_s=t3 - t2, params=n_all,
                  trainable=n_train, devices=mesh.size,
                  from_cache="/jax/compilation_cache/cache_hits" in hits)
    for field in ("temp", "argument", "output", "alias", "generated_code"):
        report[f"{field}_bytes"] = int(getattr(mem, f"{field}_size_in_bytes", 0) or 0)
    gib = lambda n: n / 2**30  # noqa: E731
    source = " (loaded from the compile cache)" if report["from_cache"] else ""
    log(f"compiled in {report['compile_s']:.1f} s{source} (tracing {report['trace_s']:.1f} s); "
        f"per device: temporaries {gib(report['temp_bytes']):.2f} GiB, arguments "
        f"{gib(report['argument_bytes']):.2f} GiB, outputs {gib(report['output_bytes']):.2f} "
        f"GiB ({gib(report['alias_bytes']):.2f} GiB donated and reused)")
    return report


def check_trainable_from(model: nnx.Module) -> None:
    """Refuse to train a model whose frozen scalars that releases lack are unknown
    (``VLMRelease.scalars``: SigLIP's logit_scale/logit_bias, in a release converted
    without the SigLIP weights): the score-map loss would be NaN from step 1."""
    vlm = getattr(model, "vlm", None)
    if vlm not in vlm_names():
        return
    spec = get_vlm(vlm)
    unset = []
    for key in spec.release.scalars:
        value = model
        for name in key.split("."):
            value = getattr(value, name)
        if not np.all(np.isfinite(np.asarray(value[...]))):
            unset.append(name)
    if unset:
        raise UserError(f"{spec.title}'s {'/'.join(unset)} are unset in these weights (a "
                        f"release converted without --{vlm}): reconvert with --{vlm} "
                        f"{spec.weights.file} to train; evaluation does not need them")
