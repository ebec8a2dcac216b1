"""The interactive page (scripts/app.py, issue 32): what it refuses, flip TTA as the
evaluator's, and the page itself in the system's headless Chromium (Selenium) against the
app on a free loopback port, serving the toy model of tests/toy.py."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest

from tests.support import REPO
from tests.toy import register_toy, toy_config

register_toy()
from mfuser_jax.run import app as A  # noqa: E402
from mfuser_jax.errors import UserError  # noqa: E402

SAMPLE = os.path.join(REPO, "docs", "samples", "street_1.jpg")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _png_header(path, w, h):
    """A PNG whose header says w x h and whose pixel data is missing: reading its size is
    cheap, decoding it fails."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\0" * 8))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A toy workdir: the model as built, saved as a model checkpoint, W/config.json."""
    from tests.demo_workdir import make_demo_workdir
    return make_demo_workdir(str(tmp_path_factory.mktemp("app_toy")), toy_config())


@pytest.fixture(scope="module")
def page(workdir, tmp_path_factory):
    return A.Page.from_workdir(workdir, toy_config(), str(tmp_path_factory.mktemp("app_out")))


def test_uploads_a_user_can_send_end_in_a_message(tmp_path):
    from PIL import Image
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "corrupt.jpg").write_bytes(data[:len(data) // 3])
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "dot.png")
    _png_header(tmp_path / "huge.png", 20000, 20000)
    _png_header(tmp_path / "big.png", 9000, 9000)
    assert A.load_upload(str(tmp_path / "ok.jpg")).shape == (40, 60, 3)
    for name, needle in (("notes.txt", "notes.txt is not a readable image"),
                         ("corrupt.jpg", "corrupt.jpg is not a readable image"),
                         ("dot.png", "1x1: too small"),
                         ("big.png", "9000x9000 = 81 Mpx; this page takes at most 40 Mpx"),
                         ("huge.png", "400000000 pixels.*this page takes at most 40 Mpx")):
        with pytest.raises(UserError, match=needle):
            A.load_upload(str(tmp_path / name))
    with pytest.raises(UserError, match="upload an image"):
        A.load_upload(None)


def test_class_lists_a_user_can_type_end_in_a_message():
    assert A.parse_names("road, car\nsky,", ["x"]) == ["road", "car", "sky"]
    for text, needle in (("", "the class list is empty"), (" , ", "the class list is empty"),
                         ("road, car, road", "'road' is given twice"),
                         ("road,,car", "entry 2 is empty"),
                         ("a" * 61, "has 61 characters; at most 60"),
                         (",".join(f"c{i}" for i in range(65)), "65 class names; at most")):
        with pytest.raises(UserError, match=needle):
            A.parse_names(text, ["road"])


def test_page_segments_with_the_predict_path_and_flip_as_the_evaluator(page, tmp_path):
    """The page's labels are Segmenter's (predict.py's path); flip TTA is ImageEvaluator's."""
    from PIL import Image

    from mfuser_jax.run.evaluate import ImageEvaluator
    from mfuser_jax.run.predict import Segmenter
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert page.will_compile(str(tmp_path / "a.png"), "red, green, blue")
    r = page.run(str(tmp_path / "a.png"), "red, green, blue")
    assert not page.will_compile(str(tmp_path / "a.png"), "red, green, blue")
    assert r["first"] and "compiled" in r["message"]
    again = page.run(str(tmp_path / "a.png"), "red, green, blue")
    assert not again["first"] and "compiled" not in again["message"]
    labels = page.base(image)
    np.testing.assert_array_equal(np.asarray(Image.open(r["labels_png"])), labels)
    np.testing.assert_array_equal(r["mask"], page.base.colorize(labels))
    assert [n for n, _, _ in r["rows"]] == ["red", "green", "blue"]
    assert sum(p for _, _, p in r["rows"]) == pytest.approx(100.0)
    sub = page.run(str(tmp_path / "a.png"), "blue, red")
    assert [n for n, _, _ in sub["rows"]] == ["blue", "red"]
    flip = page.base.with_options(flip=True)
    assert isinstance(flip, Segmenter) and flip.model is page.base.model
    pred = {}
    ev = ImageEvaluator(page.base.model, num_classes=3, crop=16, stride=11, crop_batch=8,
                        flip=True, on_prediction=lambda b, p: pred.setdefault("p", p))
    ev(image[None], np.zeros((1, 20, 30), np.int32))
    np.testing.assert_array_equal(flip(image), np.asarray(pred["p"]).reshape(20, 30))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Trap:
    """A loopback 'proxy' that only counts connections: the server's outbound HTTP(S)
    (httpx, urllib, requests honour HTTP(S)_PROXY) would reach it, not the network."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
    """scripts/app.py on a free loopback port, as a user starts it; analytics asked for
    by the environment, outbound HTTP(S) sent to a trap."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("app_log") / "app.log", "w+")
    trap = _Trap()
    proxies = {k: trap.url for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                     "https_proxy", "all_proxy")}
    env = dict(os.environ, JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="True", **proxies,
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    proc = subprocess.Popen([sys.executable, "scripts/app.py", "--workdir", workdir,
                             "--config", "tests/toy_config.py", "--port", str(port),
                             # larger windows than the toy's 16 px: fewer at 512x256
                             "--config.evaluation.crop_size=128",
                             "--config.evaluation.stride=96"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"the app did not start:\n{log.read()}")
            time.sleep(0.5)
    try:
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        trap.sock.close()
    assert trap.connections == 0, "the app tried to reach another host"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no system Chromium (apt-get install chromium chromium-driver; "
                    ".ci/run installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1300",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _requested_hosts(driver):
    import json
    hosts = set()
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            u = urlparse(msg["params"]["request"]["url"])
            if u.scheme in ("http", "https", "ws", "wss"):
                hosts.add(u.hostname)
    return hosts


def _legend(driver):
    from selenium.webdriver.common.by import By
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#legend .legend-name")]


# Gradio re-renders what a check reads: an element found, then replaced before its text is
# read, is a retry, not a failure (seen once under a loaded suite).
def _wait(driver, timeout):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException))


def _run_and_wait(driver, until, timeout=120):
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, "#run").click()
    _wait(driver, timeout).until(lambda d: until(d))


def _upload(driver, path):
    from selenium.webdriver.common.by import By
    clear = driver.find_elements(By.CSS_SELECTOR, "#upload button[aria-label='Clear']")
    if clear:
        clear[0].click()
    _wait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(path)
    shown = f"#upload td.filename[aria-label='{os.path.basename(path)}']"
    _wait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, shown))


def test_the_page_in_a_headless_browser(browser, server, tmp_path):
    """Upload a sample, segment, check the overlay's size and the legend; edit the class
    list; upload a non-image; nothing requested from any host but the app's."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    url, proc, log = server
    d = browser
    d.get(url)
    _upload(d, SAMPLE)
    overlay = "#overlay img"

    def overlay_ready(drv):
        imgs = drv.find_elements(By.CSS_SELECTOR, overlay)
        return imgs and drv.execute_script("return arguments[0].complete && "
                                           "arguments[0].naturalWidth", imgs[0])
    _run_and_wait(d, lambda drv: overlay_ready(drv) and _legend(drv))
    img = d.find_element(By.CSS_SELECTOR, overlay)
    size = d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                            img)
    assert tuple(size) == Image.open(SAMPLE).size
    assert _legend(d) == ["red", "green", "blue"]
    assert "s" in d.find_element(By.CSS_SELECTOR, "#status").text
    # the class list edited: the legend follows
    box = d.find_element(By.CSS_SELECTOR, "#names textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("blue, red")
    _run_and_wait(d, lambda drv: _legend(drv) == ["blue", "red"])
    # a duplicate name: a message on the page
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("blue, blue")
    _run_and_wait(d, lambda drv: "given twice" in drv.find_element(By.CSS_SELECTOR,
                                                                   "#status").text)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("red, green, blue")
    # a file that is no image: a message, and the server still answers afterwards
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    _upload(d, str(notes))
    _run_and_wait(d, lambda drv: "is not a readable image" in drv.find_element(
        By.CSS_SELECTOR, "#status").text)
    _upload(d, SAMPLE)
    _run_and_wait(d, lambda drv: overlay_ready(drv) and _legend(drv) == ["red", "green",
                                                                         "blue"])
    assert proc.poll() is None
    hosts = _requested_hosts(d)  # the browser's requests; the server's: the trap
    assert hosts and hosts <= {"127.0.0.1", "localhost"}, hosts
    log.seek(0)
    assert "Traceback" not in log.read()


def test_a_taken_port_is_one_line_before_the_restore(workdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "scripts/app.py", "--workdir", workdir, "--config",
                            "tests/toy_config.py", "--port", str(port)], cwd=REPO,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                           text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot serve on 127.0.0.1:"
                                                         f"{port} (")
    assert "Traceback" not in r.stderr and "restoring" not in r.stdout


def test_two_requests_at_once_are_both_answered(server):
    """Two clients submitting at once: queued, both answered (gradio_client, loopback)."""
    from gradio_client import Client, handle_file
    url, proc, _ = server
    results = {}

    def one(i):
        c = Client(url, verbose=False, download_files=False)
        results[i] = c.predict(handle_file(SAMPLE), "red, green, blue", "native size", False,
                               api_name="/segment")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1] and proc.poll() is None
    for r in results.values():
        assert "512x256 image" in r[-1] and "red" in r[2]
