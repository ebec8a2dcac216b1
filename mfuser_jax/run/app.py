"""The interactive page (scripts/app.py): segment an uploaded photo with any class names.

`Page` holds one restored model (predict.Segmenter, the predictor and resizing of
scripts/predict.py) and answers one request at a time; `build_page` wraps it in Gradio
(the optional extra: pip install -e ".[app]"). Everything a user can send (a file that is
no image, a corrupt or huge one, bad class names) ends in a message on the page."""

import html
import os
import time
from collections import OrderedDict

import numpy as np

from mfuser_jax.errors import UserError

# An upload above this many pixels is refused from its header, before it is decoded
# (a 20000x20000 photo would take 1.2 GB as RGB, more as scores). 40 Mpx: any camera.
MAX_PIXELS = 40_000_000
MIN_SIDE = 2          # narrower images have no area to resize or slide a window over
MAX_NAME_CHARS = 60   # the text tower's 77 tokens hold this; longer ones are refused
MAX_CLASSES = 64
ALPHA = 0.5           # mask opacity in the overlay, as scripts/predict.py --alpha
SAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "docs", "samples")
ZERO_SHOT_NOTE = ("Class names are embedded by this model's own text tower, so any name "
                  "can be tried; how well the decoder follows a name it was not trained on "
                  "depends on training (the trained ones are the default list).")


def load_upload(path, max_pixels=MAX_PIXELS):
    """uint8 (h, w, 3) RGB of an uploaded file; UserError with the reason otherwise. The
    size comes from the header, so a huge image is refused before it is decoded."""
    from PIL import Image
    if not path:
        raise UserError("upload an image or pick a sample first")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise UserError(f"the image is {w}x{h} = {w * h / 1e6:.0f} Mpx; this page "
                                f"takes at most {max_pixels / 1e6:.0f} Mpx (downscale it)")
            if min(w, h) < MIN_SIDE:
                raise UserError(f"the image is {w}x{h}: too small to segment (at least "
                                f"{MIN_SIDE} px a side)")
            return np.asarray(im.convert("RGB"))
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        # PIL's own guard (above ~179 Mpx) speaks first, also from the header alone
        raise UserError(f"the image is too large ({e}); this page takes at most "
                        f"{max_pixels / 1e6:.0f} Mpx (downscale it)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{os.path.basename(path)} is not a readable image "
                        f"({str(e) or type(e).__name__})") from e


def parse_names(text, default):
    """The page's class list (comma- or newline-separated) -> names; empty means refused."""
    from mfuser_jax.run.predict import parse_class_names
    text = (text or "").replace("\n", ",").strip().strip(",")
    if not text.strip():
        raise UserError("the class list is empty: give at least one class name "
                        f"(the model's own: {', '.join(default)})")
    names = parse_class_names(text, flag="class names")
    long = [n for n in names if len(n) > MAX_NAME_CHARS]
    if long:
        raise UserError(f"class name {long[0][:40]!r}... has {len(long[0])} characters; at "
                        f"most {MAX_NAME_CHARS}")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{len(names)} class names; at most {MAX_CLASSES}")
    return names


def legend_rows(names, palette, labels):
    """[(name, '#rrggbb', share of pixels in %)] for each class, in the list's order."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=len(names))
    total = max(int(counts.sum()), 1)
    return [(n, "#" + "".join(f"{int(c):02x}" for c in col), 100.0 * int(k) / total)
            for n, col, k in zip(names, palette, counts)]


def legend_html(rows):
    body = "".join(
        f'<tr class="legend-row"><td><span style="display:inline-block;width:1.2em;'
        f'height:1.2em;background:{c};border:1px solid #555"></span></td>'
        f'<td class="legend-name">{html.escape(n)}</td><td>{c}</td>'
        f'<td style="text-align:right">{p:.1f}%</td></tr>' for n, c, p in rows)
    return ('<table class="legend"><tr><th></th><th>class</th><th>colour</th>'
            f'<th>pixels</th></tr>{body}</table>')


class Page:
    """What the page does, without Gradio: restore once, then segment requests."""

    def __init__(self, segmenter, out_dir, keep=4):
        self.base = segmenter
        self.default_names = list(segmenter.config.model.class_names)
        self.protocol_scale = segmenter.test_scale
        self.out_dir = out_dir
        self._segmenters = OrderedDict()   # (names, scale, flip) -> Segmenter, a few kept
        self._compiled = set()             # what has run once: later runs are fast
        self._keep = keep

    @classmethod
    def from_workdir(cls, workdir, config=None, out_dir=None):
        from mfuser_jax.run.predict import Segmenter
        import tempfile
        seg = Segmenter.from_workdir(workdir, config)
        return cls(seg, out_dir or tempfile.mkdtemp(prefix="mfuser_app_"))

    def scale_text(self):
        s = self.protocol_scale
        return f"protocol scale {s[0]}x{s[1]}" if s else "protocol scale (own size)"

    def segmenter(self, names, scale, flip):
        key = (tuple(names), scale, bool(flip))
        if key not in self._segmenters:
            default = names == self.default_names
            self._segmenters[key] = self.base.with_options(
                class_names=None if default else names, test_scale=scale, flip=flip)
            while len(self._segmenters) > self._keep:
                self._segmenters.popitem(last=False)
        self._segmenters.move_to_end(key)
        return self._segmenters[key]

    def run(self, path, class_text, at_protocol=True, flip=False):
        """-> dict(overlay, mask, rows, labels_png, message) or raises UserError."""
        from PIL import Image

        from mfuser_jax.files import atomic_write
        from mfuser_jax.run.predict import label_ids_for
        names = parse_names(class_text, self.default_names)
        image = load_upload(path)
        h, w = image.shape[:2]
        scale = self.protocol_scale if at_protocol else None
        seg = self.segmenter(names, scale, flip)
        key = (tuple(names), scale, bool(flip), h, w)
        first = key not in self._compiled
        t0 = time.perf_counter()
        try:
            labels = seg(image)
        except ValueError as e:  # e.g. the tokenizer's "needs N tokens" for a name
            raise UserError(f"the model could not take these class names: {e}") from e
        took = time.perf_counter() - t0
        self._compiled.add(key)
        mask = seg.colorize(labels)
        overlay = (image * (1 - ALPHA) + mask * ALPHA).astype(np.uint8)
        try:
            ids, kind = label_ids_for(names, seg.config)[labels], "label ids"
        except UserError:  # names without label ids: the class index, as --outputs trainid
            ids, kind = labels.astype(np.uint8), "class indices (0 = first name)"
        os.makedirs(self.out_dir, exist_ok=True)
        png = os.path.join(self.out_dir, f"labels_{w}x{h}_{int(time.time() * 1e3)}.png")
        with atomic_write(png) as (tmp,):
            Image.fromarray(ids.astype(np.uint8)).save(tmp, format="PNG")
        at = (f"resized to {scale[0]}x{scale[1]} (keep-ratio) and back" if scale
              else "at its own size")
        compiled = (" (the first request at this size, class list and flip setting: "
                    "the predictor was compiled, or read from the compile cache)"
                    if first else "")
        message = (f"{w}x{h} image, {at}, {len(names)} classes, flip "
                   f"{'on' if flip else 'off'}: {took:.2f} s{compiled}. The PNG holds "
                   f"{kind}.")
        return dict(overlay=overlay, mask=mask, rows=legend_rows(names, seg.palette, labels),
                    labels_png=png, message=message, seconds=took, first=first)

    def will_compile(self, path, class_text, at_protocol=True, flip=False):
        """True when this request compiles first (the page says so while it runs)."""
        try:
            from PIL import Image
            names = parse_names(class_text, self.default_names)
            with Image.open(path) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - run() reports what is wrong
            return False
        scale = self.protocol_scale if at_protocol else None
        return (tuple(names), scale, bool(flip), h, w) not in self._compiled


def samples():
    """The shipped sample photos (docs/samples), sorted."""
    if not os.path.isdir(SAMPLES_DIR):
        return []
    return sorted(os.path.join(SAMPLES_DIR, f) for f in os.listdir(SAMPLES_DIR)
                  if f.lower().endswith((".png", ".jpg")))


def build_page(page, title="MFuser: segment your photo"):
    """The Gradio Blocks of `page`; launch with launch_page. Local only: no analytics, no
    share link, system fonts (the default theme would fetch Google fonts)."""
    # whatever the environment says: Gradio's analytics and version check call home
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    def segment(path, class_text, scale_choice, flip):
        try:
            r = page.run(path, class_text, scale_choice != "native size", flip)
        except UserError as e:
            return None, None, "", None, f"**Error:** {html.escape(str(e))}"
        except Exception as e:  # noqa: BLE001 - the server stays up for the next request
            return None, None, "", None, (f"**Error:** {type(e).__name__}: "
                                          f"{html.escape(str(e))}")
        return (r["overlay"], r["mask"], legend_html(r["rows"]), r["labels_png"],
                html.escape(r["message"]))

    def announce(path, class_text, scale_choice, flip):
        if path and page.will_compile(path, class_text, scale_choice != "native size", flip):
            return "Compiling the predictor for this size (the first request at a new " \
                   "size takes longer)..."
        return "Segmenting..."

    with gr.Blocks(analytics_enabled=False, title=title) as demo:
        gr.Markdown(f"## {html.escape(title)}\n{ZERO_SHOT_NOTE}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image", type="filepath", elem_id="upload")
                if samples():
                    gr.Examples(samples(), inputs=[upload], label="samples")
                names = gr.Textbox(", ".join(page.default_names), lines=3,
                                   label="class names (comma-separated)", elem_id="names")
                scale = gr.Radio([page.scale_text(), "native size"],
                                 value=page.scale_text(), label="size", elem_id="scale")
                flip = gr.Checkbox(False, label="flip test-time augmentation", elem_id="flip")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column():
                status = gr.Markdown("", elem_id="status")
                # no share button: it would offer to upload to an outside service
                overlay = gr.Image(label="overlay", type="numpy", elem_id="overlay",
                                   format="png", buttons=["download", "fullscreen"])
                legend = gr.HTML(elem_id="legend")
                mask = gr.Image(label="colour mask", type="numpy", elem_id="mask",
                                format="png", buttons=["download", "fullscreen"])
                labels = gr.File(label="label-id PNG", elem_id="labels")
        inputs = [upload, names, scale, flip]
        run.click(announce, inputs, status, queue=False, api_visibility="private").then(
            segment, inputs, [overlay, mask, legend, labels, status], concurrency_limit=1,
            api_name="segment")
    return demo


def launch_page(demo, host="127.0.0.1", port=7860, max_file_size="100mb", **kw):
    demo.queue(default_concurrency_limit=1, max_size=32)  # one at a time, the rest wait
    theme = __import__("gradio").themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"])
    return demo.launch(server_name=host, server_port=port, share=False, show_error=False,
                       max_file_size=max_file_size, theme=theme, ssr_mode=False,
                       mcp_server=False, enable_monitoring=False, footer_links=[], **kw)
