"""The web playground (`GET /`) in a real headless Chromium, driven over WebDriver (selenium), against `sana serve`
on the embedded model (CPU). Run by tests/playground.sh; exits non-zero on any failure.

1. generate: opens `/`, types a prompt and a seed, starts a run, sees a preview (a decoded image in the running
   slot) and per-step progress, then the final image; reads its pixels from the page and the scene checker
   (tools/scenes/world.py) finds what the prompt asks for. The card's "copy as curl" command, run by curl, gives the
   same image bytes. Every control has a label, the page fits a phone-width screen, the CSP header is there.
   Takes the README's screenshot (docs/playground.png).
2. api key: a server with `--api-key`: the page asks for the key before any call, then works (started with
   Ctrl+Enter, random seed shown), and remembers the key across a reload.
3. cancel: a long run is cancelled from the page; the server counts the request as cancelled and still serves.
4. errors: the server's messages are shown as they come (a 400, a 429 with its retry time).
5. edit: uploads a generated scene, paints a mask over its left half, asks for another object there; the
   checker finds it, and the unpainted right side comes back unchanged. Takes docs/playground-edit.png.
After each test the browser's console must hold no errors (the 400 and 429 of test 4 are the only ones allowed).
"""
import base64
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

ROOT = pathlib.Path(__file__).resolve().parents[1]
SANA = pathlib.Path(os.environ.get("SANA_BIN", ROOT / "target/release/sana"))
SCREENSHOT = ROOT / "docs/playground.png"
sys.path.insert(0, str(ROOT / "tools/scenes"))
import world  # noqa: E402

PROMPT = "a large red circle on the left on a blue background"
SCREENSHOT_EDIT = ROOT / "docs/playground-edit.png"
EXPECTED = dict(background="blue", objects=[dict(color="red", shape="circle", position="left", size="large")])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sana serve` on the embedded model with extra flags, on a free loopback port."""

    def __init__(self, *flags, key=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key = key
        tmp = tempfile.mkdtemp(prefix="sana-playground-")
        self.log = open(os.path.join(tmp, "serve.log"), "w")
        env = dict(os.environ, SANA_CACHE_DIR=os.path.join(tmp, "cache"))
        for name in ("SANA_MODEL", "SANA_API_KEY", "SANA_RATE_LIMIT", "SANA_NO_PLAYGROUND"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [str(SANA), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--devices", "cpu", *flags],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.time() + 60
        while True:
            try:
                self.get("/ready")
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise SystemExit(f"server did not become ready; log:\n{open(self.log.name).read()}")
                time.sleep(0.1)

    def get(self, path):
        req = urllib.request.Request(self.base + path)
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        with urllib.request.urlopen(req, timeout=5) as res:
            return res.status, dict(res.headers), res.read()

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def browser(width=1280, height=1000):
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    return driver


def wait(what, predicate, timeout=60.0):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def phone_width_overflow(driver):
    """How many CSS pixels the page is wider than a 390-pixel phone screen (emulated: a desktop window cannot be
    made that narrow)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    width = driver.execute_script("return window.innerWidth")
    assert width == 390, width
    return driver.execute_script("return document.documentElement.scrollWidth - document.documentElement.clientWidth")


def console_errors(driver, allowed=()):
    entries = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    return [e["message"] for e in entries if not any(a in e["message"] for a in allowed)]


def status(driver):
    return driver.find_element(By.ID, "status").text


def fill(driver, element_id, text):
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def open_page(driver, server):
    driver.get(server.base + "/")
    wait("the sizes from /info", lambda: driver.find_elements(By.CSS_SELECTOR, "#size option"))


def result_cards(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#gallery .card")


def image_pixels(driver, img):
    """The decoded pixels of an <img> as uint8 [h, w, 3], read through a canvas in the page."""
    data = driver.execute_script(
        "const img = arguments[0]; const c = document.createElement('canvas');"
        "c.width = img.naturalWidth; c.height = img.naturalHeight;"
        "const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);"
        "return [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];", img)
    w, h, rgba = data
    return np.array(rgba, np.uint8).reshape(h, w, 4)[:, :, :3]


def png_pixels_in_page(driver, png: bytes):
    """Pixels of a PNG decoded by the page's browser (through a data: URL, which the CSP allows for images)."""
    data = driver.execute_async_script(
        "const done = arguments[1]; const img = new Image();"
        "img.onload = () => { const c = document.createElement('canvas'); c.width = img.naturalWidth;"
        "  c.height = img.naturalHeight; const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);"
        "  done([c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)]); };"
        "img.onerror = () => done(null);"
        "img.src = 'data:image/png;base64,' + arguments[0];", base64.b64encode(png).decode())
    assert data is not None, "the browser cannot decode the PNG"
    w, h, rgba = data
    return np.array(rgba, np.uint8).reshape(h, w, 4)[:, :, :3]


def sse_events(text):
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        kind, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if kind:
            events.append((kind, json.loads("\n".join(data))))
    return events


def test_generate(driver):
    server = Server()
    try:
        status_code, headers, body = server.get("/")
        csp = headers.get("content-security-policy", "")
        assert status_code == 200 and "default-src 'none'" in csp and "script-src 'self'" in csp, headers
        open_page(driver, server)
        assert "sana-tiny-scenes" in driver.find_element(By.ID, "server").text
        assert driver.find_element(By.ID, "key-box").is_displayed() is False

        unlabelled = driver.execute_script(
            "return [...document.querySelectorAll('input, select, textarea, button, canvas')].filter(el =>"
            " !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())"
            ".map(el => el.id || el.outerHTML);")
        assert unlabelled == [], f"controls without a label: {unlabelled}"
        sizes = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#size option")]
        assert sizes[0] == "64x64" and all(s.count("x") == 1 for s in sizes), sizes

        fill(driver, "prompt", PROMPT)
        fill(driver, "steps", "60")
        driver.find_element(By.ID, "random-seed").click()
        fill(driver, "seed", "7")
        driver.find_element(By.ID, "run").click()

        seen = {"preview": None, "progress": set()}

        def preview_then_final():
            # One script per poll: the running slots go away when their image completes.
            now = driver.execute_script(
                "const out = {captions: [], preview: null, cards: document.querySelectorAll('#gallery .card').length};"
                "for (const slot of document.querySelectorAll('#current .slot')) {"
                "  out.captions.push(slot.querySelector('figcaption').textContent);"
                "  const img = slot.querySelector('img');"
                "  if (!out.preview && img.dataset.preview && img.complete && img.naturalWidth) {"
                "    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;"
                "    const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);"
                "    out.preview = [c.width, c.height, Array.from(ctx.getImageData(0, 0, c.width, c.height).data)];"
                "  }"
                "}"
                "return out;")
            seen["progress"].update(c for c in now["captions"] if c.startswith("Step"))
            if now["preview"] and seen["preview"] is None:
                w, h, rgba = now["preview"]
                seen["preview"] = np.array(rgba, np.uint8).reshape(h, w, 4)[:, :, :3]
            return now["cards"] and result_cards(driver)

        cards = wait("the final image", preview_then_final)
        assert seen["preview"] is not None, "no preview was shown before the final image"
        assert seen["progress"], "no progress was shown"
        card = cards[0]
        img = card.find_element(By.CSS_SELECTOR, "img.result")
        pixels = image_pixels(driver, img)
        assert pixels.shape == (64, 64, 3), pixels.shape
        found = world.check(pixels)
        print(f"  checker: {found['background']} background, objects {[(o['size'], o['color'], o['shape'], o['position']) for o in found['objects']]}")
        assert found["background"] == EXPECTED["background"], found
        assert found["objects"], found
        for key, value in EXPECTED["objects"][0].items():
            assert found["objects"][0][key] == value, (key, found)
        preview_rms = float(np.sqrt(((seen["preview"].astype(float) - pixels.astype(float)) ** 2).mean()))
        print(f"  preview seen ({len(seen['progress'])} progress captions); preview vs final rms {preview_rms:.1f}")
        assert "seed 7" in status(driver), status(driver)
        assert img.get_attribute("data-seed") == "7"

        # Copy as curl: the exact request, run by curl, gives the same image.
        command = card.find_element(By.TAG_NAME, "textarea").get_attribute("value")
        assert command.startswith("curl -N " + server.base + "/v1/images/generations"), command
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True).stdout
        completed = [d for k, d in sse_events(out) if k == "image_generation.completed"]
        assert len(completed) == 1 and completed[0]["seed"] == 7, out[:500]
        from_curl = png_pixels_in_page(driver, base64.b64decode(completed[0]["b64_json"]))
        assert np.array_equal(from_curl, pixels), "curl gave another image"
        print("  copy as curl: the same image, pixel for pixel")

        # A second run of two images for the screenshot, then a phone-width screen.
        fill(driver, "prompt", "a small yellow square at the top and a large purple triangle at the bottom on a white background")
        fill(driver, "n", "2")
        fill(driver, "steps", "")
        driver.find_element(By.ID, "run").click()
        wait("two more images", lambda: len(result_cards(driver)) == 3)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
        print(f"  screenshot: {SCREENSHOT.relative_to(ROOT)}")
        overflow = phone_width_overflow(driver)
        assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
        assert driver.find_element(By.ID, "run").is_displayed()
        assert console_errors(driver) == [], console_errors(driver)
    finally:
        server.close()


def test_api_key(driver):
    server = Server("--api-key", "playground-secret", key="playground-secret")
    try:
        status_code, _, _ = server.get("/")  # the page itself needs no key
        assert status_code == 200
        driver.get(server.base + "/")
        key_box = wait("the key box", lambda: driver.find_element(By.ID, "key-box").is_displayed()
                       and driver.find_element(By.ID, "key-box"))
        assert "API key" in status(driver), status(driver)
        assert not driver.find_element(By.ID, "run").is_enabled()
        key = key_box.find_element(By.ID, "api-key")
        key.send_keys("playground-secret", Keys.ENTER)
        wait("the sizes from /info", lambda: driver.find_elements(By.CSS_SELECTOR, "#size option"))
        assert driver.find_element(By.ID, "run").is_enabled()
        prompt = driver.find_element(By.ID, "prompt")
        prompt.send_keys(PROMPT, Keys.CONTROL, Keys.ENTER)
        wait("the final image", lambda: result_cards(driver))
        assert "(random)" in status(driver), status(driver)
        seed = driver.find_element(By.ID, "seed").get_attribute("value")
        assert seed.isdigit() and f"seed {seed}" in status(driver), (seed, status(driver))
        command = result_cards(driver)[0].find_element(By.TAG_NAME, "textarea").get_attribute("value")
        assert "$SANA_API_KEY" in command and "playground-secret" not in command, command
        driver.refresh()
        wait("the sizes from /info after a reload", lambda: driver.find_elements(By.CSS_SELECTOR, "#size option"))
        assert driver.find_element(By.ID, "api-key").get_attribute("value") == "playground-secret"
        assert console_errors(driver) == [], console_errors(driver)
    finally:
        server.close()


def test_cancel(driver):
    server = Server()
    try:
        open_page(driver, server)
        select = Select(driver.find_element(By.ID, "size"))
        select.select_by_value("128x128")
        fill(driver, "prompt", PROMPT)
        fill(driver, "n", "4")
        fill(driver, "steps", "100")
        driver.find_element(By.ID, "run").click()
        wait("progress", lambda: any(c.text.startswith("Step") for c in
                                     driver.find_elements(By.CSS_SELECTOR, "#current figcaption")))
        driver.find_element(By.ID, "cancel").click()
        wait("the cancelled status", lambda: status(driver).startswith("Cancelled"), timeout=10)
        assert result_cards(driver) == []
        captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#current figcaption")]
        assert captions and all(c == "Cancelled" for c in captions), captions

        def cancelled_on_server():
            metrics = server.get("/metrics")[2].decode()
            return any(line.startswith("sana_request_failure") and 'err="cancelled"' in line
                       and float(line.split()[-1]) >= 1 for line in metrics.splitlines())
        wait("the server to cancel the request", cancelled_on_server, timeout=20)
        print("  cancelled in the page and on the server")
        fill(driver, "n", "1")
        fill(driver, "steps", "2")
        driver.find_element(By.ID, "run").click()
        wait("a run after the cancel", lambda: result_cards(driver))
        assert console_errors(driver) == [], console_errors(driver)
    finally:
        server.close()


def test_errors(driver):
    server = Server("--rate-limit", "2")  # a minute's worth: the 400 and the first image
    try:
        open_page(driver, server)
        fill(driver, "prompt", PROMPT)
        fill(driver, "steps", "1000")
        driver.find_element(By.ID, "run").click()
        wait("the 400 message", lambda: status(driver).startswith("Error 400"))
        assert "num_inference_steps" in status(driver) or "steps" in status(driver), status(driver)
        print(f"  {status(driver)}")
        fill(driver, "steps", "2")
        driver.find_element(By.ID, "run").click()
        wait("the first image", lambda: result_cards(driver))
        driver.find_element(By.ID, "run").click()
        wait("the 429 message", lambda: status(driver).startswith("Error 429"))
        assert "retry after" in status(driver), status(driver)
        print(f"  {status(driver)}")
        assert driver.find_element(By.ID, "status").get_attribute("class") == "error"
        logged = console_errors(driver)
        # The console is read for real: the browser logs the 400 and 429 responses, and nothing else.
        assert any("status of 429" in m for m in logged), logged
        assert [m for m in logged if "status of 400" not in m and "status of 429" not in m] == [], logged
    finally:
        server.close()


def test_edit(driver):
    server = Server()
    try:
        body = json.dumps({"prompt": PROMPT, "seed": 7, "size": "64x64"}).encode()
        req = urllib.request.Request(server.base + "/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as res:
            png = base64.b64decode(json.load(res)["data"][0]["b64_json"])
        source = pathlib.Path(tempfile.mkdtemp(prefix="sana-edit-")) / "scene.png"
        source.write_bytes(png)

        open_page(driver, server)
        driver.find_element(By.ID, "mode-edit").click()
        assert driver.find_element(By.ID, "run").text == "Edit"
        assert Select(driver.find_element(By.ID, "size")).first_selected_option.get_attribute("value") == "auto"
        driver.find_element(By.ID, "image").send_keys(str(source))
        canvas = wait("the image on the canvas", lambda: driver.find_element(By.ID, "mask-box").is_displayed()
                      and driver.find_element(By.ID, "edit-canvas"))
        original = png_pixels_in_page(driver, png)
        driver.find_element(By.ID, "brush").send_keys(Keys.END)  # the widest brush
        w, h = canvas.size["width"], canvas.size["height"]
        assert w > 200, f"the canvas shows a 64-pixel image {w} px wide"
        for y in range(4, h, max(1, h // 8)):  # strokes across the left half
            ActionChains(driver).move_to_element_with_offset(canvas, -w // 2 + 1, y - h // 2) \
                .click_and_hold().move_by_offset(w // 2 - 1, 0).release().perform()
        fill(driver, "prompt", "a large yellow square on the left on a blue background")
        driver.find_element(By.ID, "random-seed").click()
        fill(driver, "seed", "7")
        driver.find_element(By.ID, "run").click()
        card = wait("the edited image", lambda: result_cards(driver))[0]
        pixels = image_pixels(driver, card.find_element(By.CSS_SELECTOR, "img.result"))
        assert pixels.shape == (64, 64, 3), pixels.shape
        found = world.check(pixels)
        print(f"  checker: {found['background']} background, objects {[(o['size'], o['color'], o['shape'], o['position']) for o in found['objects']]}")
        assert found["background"] == "blue" and found["objects"], found
        new = found["objects"][0]
        assert (new["color"], new["shape"], new["position"]) == ("yellow", "square", "left"), found
        kept = np.abs(pixels[:, 52:].astype(int) - original[:, 52:].astype(int)).max()
        assert kept <= 2, f"the unpainted right side changed by {kept}"
        text = card.text
        assert "edit (scene.png, mask painted)" in text, text
        command = card.find_element(By.TAG_NAME, "textarea").get_attribute("value")
        assert "/v1/images/edits" in command and "-F 'image=@scene.png'" in command and "-F 'mask=@mask.png'" in command
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(SCREENSHOT_EDIT))
        print(f"  unpainted side unchanged (max difference {kept}); screenshot: {SCREENSHOT_EDIT.relative_to(ROOT)}")
        overflow = phone_width_overflow(driver)
        assert overflow <= 0, f"edit mode is {overflow}px wider than a phone screen"
        assert console_errors(driver) == [], console_errors(driver)
    finally:
        server.close()


def main():
    failed = 0
    tests = (test_generate, test_api_key, test_cancel, test_errors, test_edit)
    for test in tests:
        driver = browser()
        t0 = time.time()
        try:
            print(f"{test.__name__} ...")
            test(driver)
            print(f"{test.__name__}: ok ({time.time() - t0:.1f} s)")
        except Exception as err:  # noqa: BLE001 - report every test, then fail
            failed += 1
            print(f"{test.__name__}: FAILED: {type(err).__name__}: {err}")
        finally:
            driver.quit()
    print(f"playground: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
