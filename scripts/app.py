#!/usr/bin/env python
"""An interactive page: segment your own photo with your own class names.

  pip install -e ".[app]"          # Gradio, the optional extra
  python scripts/app.py --workdir runs/demo [--config C] [--host 127.0.0.1] [--port 7860]

Restores the workdir once (as scripts/predict.py: W/config.json unless --config, the latest
checkpoint unless --step) and serves a page on http://HOST:PORT: upload an image or pick a
sample (docs/samples), edit the class names (any names: the model's text tower embeds them),
segment at the protocol scale or the image's own size, with or without flip test-time
augmentation; out come the overlay, the colour mask with its legend (class, colour, share
of pixels), the label-id PNG and the time taken. Requests are answered one at a time (the
others wait in the queue). Local only: bound to 127.0.0.1 unless --host says otherwise, no
share link, no analytics, nothing fetched from elsewhere. Uploads above
mfuser_jax.run.app.MAX_PIXELS (40 Mpx) are refused from their header.
"""

import os
import sys

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio loads: it calls home

import _cli  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "config file (default: the workdir's "
                                "config.json, as trained)", lock_config=True)
flags.DEFINE_string("workdir", None, "training output folder holding checkpoints/")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 exposes the page to "
                    "the network)")
flags.DEFINE_integer("port", 7860, "port")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _check_port(host, port):
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        _cli.fail(f"cannot serve on {host}:{port} ({e.strerror or e}); give another --port "
                  "or --host")


def main(argv):
    del argv
    try:
        import gradio  # noqa: F401
    except ImportError:
        _cli.fail('the page needs Gradio: pip install -e ".[app]"')
    from mfuser_jax.run import app
    from mfuser_jax.run.predict import Segmenter
    _check_port(FLAGS.host, FLAGS.port)  # before the restore, which takes minutes at full size
    config = _cli.config_or_workdir(FLAGS.config, FLAGS.workdir)
    print(f"restoring {FLAGS.workdir} (building the model takes a while)", flush=True)
    seg = _cli.run_main(Segmenter.from_workdir, FLAGS.workdir, config, step=FLAGS.step)
    import tempfile
    page = app.Page(seg, tempfile.mkdtemp(prefix="mfuser_app_"))
    print(f"checkpoint step {seg.step}; serving on http://{FLAGS.host}:{FLAGS.port}",
          flush=True)
    try:
        app.launch_page(app.build_page(page), host=FLAGS.host, port=FLAGS.port)
    except OSError as e:  # the port is taken
        _cli.fail(f"cannot serve on {FLAGS.host}:{FLAGS.port}: {e}")


if __name__ == "__main__":
    sys.exit(_cli.run_app(main))
