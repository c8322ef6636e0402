"""The playground page in a real browser: Debian's Chromium (/usr/bin/chromium, `make test` installs it with
apt-get) driven by Playwright against a live `kolors-trt serve` process on the tiny default export (ONNX Runtime,
127.0.0.1, an API key). The page's images are read back from the browser's own decoding (a canvas) and compared
with what the API returns for the same parameters; the server's /metrics show a cancelled request stop.

A missing browser fails these tests (it never skips them). KOLORS_TRT_PLAYGROUND_SCREENSHOT=docs/playground.png
writes the README's screenshot from the generation test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kolors_trt.runtime.folder import Limits, read_folder
from kolors_trt.runtime.postprocess import PNG_PARAMETERS_KEY
from kolors_trt.runtime.spec import KOLORS_SIZES, DimRange, ModelDims, Profile
from kolors_trt.serve.protocol import parse_size
from kolors_trt.serve.sizes import offered_sizes

import serve_live as live

KEY = "sk-playground-0123"
CHROMIUM = os.environ.get("KOLORS_TRT_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = os.environ.get("KOLORS_TRT_PLAYGROUND_SCREENSHOT")
UNET_RUNS = ("kolors_trt_engine_runs_total", {"component": "unet"})
TIMEOUT_MS = 30_000


def png(seed: int, size=(80, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


# ---- the model card's sizes (no browser) ------------------------------------------------------------------------


class FakeFolder:
    """The two attributes offered_sizes reads from a ModelFolder."""

    def __init__(self, profile: Profile, size_multiple: int = 32):
        self.profile = profile
        self.size_multiple = size_multiple


KOLORS_WXH = [f"{w}x{h}" for h, w in KOLORS_SIZES]


def test_an_engine_profile_offers_exactly_kolors_buckets():
    default = Profile.from_sizes(KOLORS_SIZES)  # the default engine profile: 768..1344
    sizes = offered_sizes(FakeFolder(default), {"height": 1024, "width": 1024})
    assert sorted(sizes) == sorted(KOLORS_WXH) and sizes[0] == "1024x1024"
    static = Profile.static(1, 1024, 1024)  # a CUDA-graph build: one size
    assert offered_sizes(FakeFolder(static), {"height": 1024, "width": 1024}) == ["1024x1024"]
    odd = Profile(DimRange(1, 1, 2), DimRange(640, 640, 640), DimRange(640, 704, 704))  # no bucket fits
    assert offered_sizes(FakeFolder(odd), {"height": 1024, "width": 1024}) == ["704x640"]


def test_an_export_folder_offers_the_buckets_and_small_sizes_the_server_accepts(onnx_fp32):
    folder = read_folder(onnx_fp32, verify=False)
    sizes = offered_sizes(folder, {"height": 1024, "width": 1024})
    assert set(KOLORS_WXH) <= set(sizes) and {"512x512", "256x256", "64x64", "32x32"} <= set(sizes)
    areas = [int(w) * int(h) for w, h in (s.split("x") for s in sizes)]
    assert areas == sorted(areas, reverse=True) and len(set(sizes)) == len(sizes)
    for size in sizes:  # the server's own size check takes every one, and the aspect is a bucket's exactly
        height, width = parse_size(size, folder)
        assert any(height * bw == width * bh for bh, bw in KOLORS_SIZES), size
    small = read_folder(onnx_fp32, verify=False, limits=Limits(max_side=320))
    assert offered_sizes(small, {"height": 1024, "width": 1024}) == ["256x256", "224x288", "288x224", "128x128",
                                                                       "64x64", "32x32"]
    dims = ModelDims()  # the real model's size unit
    assert dims.vae_scale * dims.latent_multiple == folder.size_multiple


def test_a_wheel_installs_the_page(tmp_path):
    """A non-editable install gets the page: the wheel setuptools builds from pyproject.toml carries the files."""
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    for name in ("kolors_trt", "export", "engines", "runtime", "serve"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert "importable package" not in built.stderr  # every folder of the package is declared
    (wheel,) = (tmp_path / "dist").glob("kolors_trt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in ("playground.html", "playground.css", "playground.js"):
            assert z.read(f"kolors_trt/serve/static/{name}") == (repo / "serve" / "static" / name).read_bytes()
        assert "kolors_trt/serve/playground.py" in z.namelist()


# ---- a live server and a browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(onnx_fp32, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("playground") / "key"
    key_file.write_text(KEY + "\n")
    srv = live.LiveServer(onnx_fp32, "--api-key-file", str(key_file), "--max-wait-ms", "0", "--timeout-s", "120",
                          key=KEY)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's package (apt-get install chromium); "
                    "KOLORS_TRT_CHROMIUM names another binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM)  # no `playwright install`: the system's browser
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    yield tab
    context.close()
    assert errors == []  # no uncaught exception in the page's script


def open_page(page, server, path: str = "/"):
    """Load the page, answer its API-key prompt, wait for the model card."""
    page.goto(server.url + path)
    key = page.get_by_label("API key", exact=True)
    key.wait_for(state="visible")
    assert page.evaluate("() => document.activeElement.id") == "api-key"  # the prompt takes the focus
    key.fill(KEY)
    key.press("Enter")
    page.wait_for_function("() => document.getElementById('size').options.length > 1")
    assert "kolors" in page.locator("#model-info").inner_text()


def metric(server, name, labels) -> float:
    return live.sample(server.metrics(), name, **labels)


def api_png(server, body: dict) -> bytes:
    with server.client(timeout=120) as http:
        r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["data"][0]["b64_json"])


def shown_pixels(page, selector: str = "#result") -> np.ndarray:
    """The image element's pixels as the browser decoded them (drawn on a canvas), [H, W, 3]."""
    got = page.evaluate("""async (selector) => {
        const img = document.querySelector(selector);
        await img.decode();
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0);
        return {w: canvas.width, h: canvas.height,
                data: Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data)};
    }""", selector)
    rgba = np.array(got["data"], dtype=np.uint8).reshape(got["h"], got["w"], 4)
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


def shown_params(page) -> dict:
    return {dd.get_attribute("data-param"): dd.inner_text() for dd in page.locator("#params dd").all()}


def download(page, folder) -> tuple:
    """Click "Download PNG": the saved file's pixels and the parameters its PNG text chunk carries."""
    with page.expect_download() as started:
        page.get_by_role("link", name="Download PNG").click()
    saved = folder / started.value.suggested_filename
    started.value.save_as(saved)
    assert saved.suffix == ".png"
    with Image.open(saved) as image:  # the server's PNG, byte for byte
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")), json.loads(image.text[PNG_PARAMETERS_KEY])


def drop_file(page, selector: str, data: bytes, name: str) -> None:
    """A drag-and-drop of a file onto ``selector``, as the browser delivers it (a DataTransfer with a File)."""
    page.evaluate("""([selector, b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        const target = document.querySelector(selector);
        target.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        target.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", [selector, base64.b64encode(data).decode(), name])


def reference_id(server, data: bytes) -> dict:
    with server.client() as http:
        r = http.post("/v1/references", files={"image": ("r.png", data, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


# ---- the page ---------------------------------------------------------------------------------------------------


def test_the_page_is_public_its_api_calls_need_the_key_and_it_loads_nothing_from_elsewhere(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:  # no key
        for path in ("/", "/playground"):
            r = http.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in r.headers["content-security-policy"]
            assert http.head(path).status_code == 200
        assert "/playground/playground.js" in r.text and "http" not in r.text.replace("http-equiv", "")
        for asset, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
            got = http.get(f"/playground/{asset}")
            assert got.status_code == 200 and got.headers["content-type"].startswith(kind)
            assert "http://" not in got.text and "https://" not in got.text  # no CDN, no other origin
        assert http.get("/playground/other.js").status_code == 401  # only the page's own files are public
        assert http.get("/v1/models").status_code == 401


def test_no_playground_turns_the_page_off(onnx_fp32):
    srv = live.LiveServer(onnx_fp32, "--no-playground").start()
    try:
        with srv.client() as http:
            for path in ("/", "/playground", "/playground/playground.js"):
                r = http.get(path)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            assert http.get("/v1/models").status_code == 200
    finally:
        srv.stop()


def test_generate_with_a_reference_shows_previews_then_the_apis_image(server, page, tmp_path):
    open_page(page, server)
    first, second = png(11), png(12, size=(48, 96))
    drop_file(page, "#drop", first, "dropped.png")  # drag and drop
    page.wait_for_function("() => document.getElementById('reference-id').textContent.startsWith('id ')")
    want_first = reference_id(server, first)  # the page uploaded these bytes: the API finds their tokens cached
    assert page.locator("#reference-id").inner_text() == f"id {want_first['id']}" and want_first["cached"]
    page.get_by_label("Choose a reference image").set_input_files(  # the file picker replaces it
        {"name": "picked.png", "mimeType": "image/png", "buffer": second})
    page.wait_for_function(f"""() => {{ const t = document.getElementById('reference-id').textContent;
        return t.startsWith('id ') && t !== 'id {want_first['id']}'; }}""")
    want = reference_id(server, second)
    assert page.locator("#reference-id").inner_text() == f"id {want['id']}" and want["cached"]

    page.get_by_label("Prompt", exact=True).fill("a red fox in the snow, watercolor")
    page.get_by_label("Negative prompt").fill("blurry")
    page.get_by_label("Size (width × height)").select_option("64x64")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Guidance scale").fill("3.5")
    page.get_by_label("Random seed").uncheck()
    page.get_by_label("Seed", exact=True).fill("1234")
    page.get_by_label("IP scale").fill("0.6")
    page.evaluate("""() => {
        window.previews = [];
        const preview = document.getElementById("preview");
        new MutationObserver(() => window.previews.push(
            [preview.src, document.getElementById("progress").value])).observe(
            preview, {attributes: true, attributeFilter: ["src"]});
    }""")
    before = metric(server, *UNET_RUNS)
    page.get_by_role("button", name="Generate").click()
    page.locator("#result").wait_for(state="visible")
    assert page.locator("#progress-label").inner_text() == "Done"
    assert metric(server, *UNET_RUNS) - before == 4

    previews = page.evaluate("() => window.previews")
    assert len(previews) >= 1 and [value for _, value in previews] == sorted(value for _, value in previews)
    for src, _ in previews:  # the stream's previews: 1/8 of the size, no VAE
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (8, 8)
    shown = shown_params(page)
    assert (shown["seed"], shown["num_inference_steps"], shown["reference_id"]) == ("1234", "4", want["id"])
    assert (shown["width"], shown["height"], shown["negative_prompt"]) == ("64", "64", "blurry")

    expected = api_png(server, {"prompt": "a red fox in the snow, watercolor", "negative_prompt": "blurry", "size": "64x64",
                                "num_inference_steps": 4, "guidance_scale": 3.5, "seed": 1234,
                                "reference_id": want["id"], "ip_adapter_scale": 0.6})
    want_pixels = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB"))
    assert np.array_equal(shown_pixels(page), want_pixels)
    plain = api_png(server, {"prompt": "a red fox in the snow, watercolor", "negative_prompt": "blurry", "size": "64x64",
                             "num_inference_steps": 4, "guidance_scale": 3.5, "seed": 1234})
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(plain)).convert("RGB")), want_pixels)  # IP mattered

    pixels, carried = download(page, tmp_path)
    assert np.array_equal(pixels, want_pixels)
    assert (carried["seed"], carried["reference_id"], carried["ip_adapter_scale"]) == (1234, want["id"], 0.6)

    # a random seed (the server's, below 2**53) is shown exactly and reproduces its image
    page.get_by_label("Random seed").check()
    page.get_by_label("Steps").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelectorAll('#history button').length === 2")
    random_pixels, carried = download(page, tmp_path)
    assert shown_params(page)["seed"] == str(carried["seed"]) and np.array_equal(shown_pixels(page), random_pixels)
    page.get_by_role("button", name="Use this seed").click()
    assert page.get_by_label("Seed", exact=True).input_value() == str(carried["seed"])
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelectorAll('#history button').length === 3")
    assert shown_params(page)["seed"] == str(carried["seed"]) and np.array_equal(shown_pixels(page), random_pixels)
    page.locator("#history button").first.click()  # the history strip: back to the first image
    assert np.array_equal(shown_pixels(page), want_pixels) and shown_params(page)["seed"] == "1234"
    if SCREENSHOT:
        page.set_viewport_size({"width": 1280, "height": 1180})
        page.screenshot(path=SCREENSHOT, full_page=True)


def test_cancel_closes_the_stream_and_the_server_stops_the_unet(server, page):
    open_page(page, server)
    page.get_by_label("Prompt", exact=True).fill("a long request")
    page.get_by_label("Size (width × height)").select_option("64x64")
    page.get_by_label("Steps").fill("500")
    stopped = ("kolors_trt_requests_stopped_total", {"reason": "disconnected", "where": "running"})
    before, stopped_before = metric(server, *UNET_RUNS), metric(server, *stopped)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.getElementById('progress').value >= 2")  # previews are arriving
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_function("() => document.getElementById('progress-label').textContent === 'Cancelled'")
    assert page.get_by_role("button", name="Generate").is_enabled()
    assert page.get_by_role("button", name="Cancel").is_disabled()
    runs, end = metric(server, *UNET_RUNS), time.monotonic() + 20
    while time.monotonic() < end:  # the counter stops: two reads a second apart agree
        time.sleep(1.0)
        again = metric(server, *UNET_RUNS)
        if again == runs:
            break
        runs = again
    assert again == runs and 2 <= runs - before < 500, (before, runs)
    assert metric(server, *stopped) - stopped_before == 1
    assert page.locator("#error").is_hidden()


def test_a_bad_size_shows_the_servers_400_message(server, page):
    open_page(page, server)
    page.get_by_label("Prompt", exact=True).fill("a bad size")
    page.get_by_label("Size (width × height)").select_option("custom")
    custom = page.get_by_label("Custom size")
    assert page.evaluate("() => document.activeElement.id") == "custom-size"
    custom.fill("100x64")
    page.get_by_label("Steps").fill("1")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.wait_for(state="visible")
    with server.client() as http:
        r = http.post("/v1/images/generations", json={"prompt": "a bad size", "size": "100x64",
                                                      "num_inference_steps": 1, "stream": True})
    assert r.status_code == 400
    error = r.json()["error"]
    assert alert.inner_text() == f"Error 400 ({error['code']}): {error['message']}"
    assert "multiple of 32" in error["message"] and page.locator("#progress-label").inner_text() == "Failed"


def test_a_sampler_and_guidance_interval_from_the_page_give_the_apis_image(server, page):
    """The sampler block sends scheduler and guidance_interval to the live server: the page shows the API's image
    for the same fields, its parameters name them, and the unconditional rows outside the interval are skipped."""
    open_page(page, server)
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    page.get_by_label("Size (width × height)").select_option("32x32")
    page.get_by_label("Steps").fill("3")
    page.get_by_label("Random seed").uncheck()
    page.get_by_label("Seed", exact=True).fill("77")
    page.get_by_label("Sampler", exact=True).select_option("unipc")
    page.get_by_label("Guidance interval low (sigma)").fill("0.28")
    page.get_by_label("Guidance interval high (sigma)").fill("5.42")
    rows = ("kolors_trt_unet_rows_total", {"graph": "unet"})
    before = metric(server, *rows)
    page.get_by_role("button", name="Generate").click()
    page.locator("#result").wait_for(state="visible")
    assert metric(server, *rows) - before == 3 + 3 - 1  # unipc at 3 steps: sigmas 5.87, 1.94, 0.77 (one outside)
    shown = shown_params(page)
    assert (shown["scheduler"], shown["guidance_interval"]) == ("unipc", "[0.28,5.42]")
    expected = api_png(server, {"prompt": "a lighthouse at dusk", "size": "32x32", "num_inference_steps": 3,
                                "seed": 77, "scheduler": "unipc", "guidance_interval": [0.28, 5.42]})
    assert np.array_equal(shown_pixels(page), np.asarray(Image.open(io.BytesIO(expected)).convert("RGB")))


def test_phone_width_labels_and_keyboard_only_use(server, browser):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_page(page, server, "/playground")
        # nothing wider than the phone: no sideways scrolling, every control inside the screen's width
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
        controls = page.locator("input:visible, select:visible, textarea:visible, button:visible").all()
        assert len(controls) >= 12
        for control in controls:
            box = control.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375, control.evaluate("e => e.outerHTML")
        unlabeled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute("aria-label") && !e.textContent.trim())
            .map((e) => e.outerHTML)""")
        assert unlabeled == []

        page.get_by_label("Prompt", exact=True).focus()  # from here on the keyboard only
        page.keyboard.type("一只小狗, keyboard only")
        order = []
        for _ in range(14):
            page.keyboard.press("Tab")
            order.append(page.evaluate("() => document.activeElement.id"))
        for wanted in ("negative", "size", "steps", "guidance", "seed-random", "reference", "generate"):
            assert wanted in order, order
        assert order.index("negative") < order.index("size") < order.index("steps") < order.index("generate")
        page.get_by_label("Random seed").focus()
        page.keyboard.press("Space")  # unchecked: the seed field takes input
        page.keyboard.press("Shift+Tab")
        assert page.evaluate("() => document.activeElement.id") == "seed"
        page.keyboard.type(str(2**53 - 1))  # the largest seed the server takes (JSON's exact integers)
        page.get_by_label("Size (width × height)").select_option("32x32")
        page.get_by_label("Steps").focus()
        page.keyboard.press("Control+A")
        page.keyboard.type("2")
        page.get_by_label("Prompt", exact=True).focus()
        page.keyboard.press("Control+Enter")
        page.locator("#result").wait_for(state="visible")
        shown = shown_params(page)
        assert (shown["prompt"], shown["seed"], shown["width"]) == ("一只小狗, keyboard only", str(2**53 - 1), "32")
        box = page.locator("#result").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375
        page.get_by_role("button", name="Generate").focus()
        page.keyboard.press("Enter")  # the button itself, by keyboard
        page.wait_for_function("() => document.querySelectorAll('#history button').length === 2")
    finally:
        context.close()


def test_optional_features_appear_only_when_the_server_advertises_them(server, page):
    """The live server advertises its samplers (the sampler block lists them after the server default) and
    DeepCache (its export holds the shallow UNet), no LoRA: the page shows no LoRA block. Then the page is shown
    a card and a LoRA list that advertise LoRA (the contract that feature implements) and sends the fields."""
    open_page(page, server)
    assert page.locator("#sampler-block").is_visible() and page.locator("#deep-cache-block").is_visible()
    assert page.locator("#sampler option").all_inner_texts() == [
        "server default (euler)", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
    assert page.locator("#lora-block").is_hidden()
    with server.client() as http:
        assert http.get("/v1/loras").status_code == 404  # not on this server yet

    sent = []

    def card(route):
        answer = route.fetch()  # the live server's card (401 until the key is given)
        if answer.status != 200:
            return route.fulfill(response=answer)
        body = answer.json()
        body["data"][0].update(samplers=["euler", "euler_a", "dpmpp_2m"], deep_cache=True)
        route.fulfill(json=body)

    def generations(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=400, json={"error": {"message": "scheduler: stand-in answer", "type":
                                                  "invalid_request_error", "param": "scheduler",
                                                  "code": "invalid_value"}})

    page.route("**/v1/models", card)
    page.route("**/v1/loras", lambda route: route.fulfill(json={"object": "list", "data": [
        {"id": "ink-style", "object": "lora"}, {"id": "pixel-art", "object": "lora"}]}))
    page.route("**/v1/images/generations", generations)
    page.reload()
    assert page.get_by_label("API key", exact=True).input_value() == ""  # the key lived in the page's memory only
    page.get_by_label("API key", exact=True).fill(KEY)
    page.get_by_role("button", name="Use key").click()
    page.locator("#lora-block").wait_for(state="visible")
    assert page.locator("#sampler-block").is_visible() and page.locator("#deep-cache-block").is_visible()
    page.get_by_label("Prompt", exact=True).fill("with options")
    page.get_by_label("Sampler", exact=True).select_option("euler_a")
    page.get_by_label("Guidance interval low (sigma)").fill("0.28")
    page.get_by_label("Guidance interval high (sigma)").fill("5.42")
    page.get_by_label("DeepCache interval").fill("3")
    page.get_by_label("pixel-art", exact=True).check()
    page.get_by_label("pixel-art weight").fill("0.8")
    page.get_by_role("button", name="Generate").click()
    page.get_by_role("alert").wait_for(state="visible")
    assert page.get_by_role("alert").inner_text() == "Error 400 (invalid_value): scheduler: stand-in answer"
    (body,) = sent
    assert (body["scheduler"], body["guidance_interval"], body["deep_cache_interval"]) == ("euler_a", [0.28, 5.42], 3)
    assert body["lora"] == {"pixel-art": 0.8} and body["stream"] is True and body["model"] == "kolors"
    assert "seed" not in body and "reference_id" not in body and "ip_adapter_scale" not in body
