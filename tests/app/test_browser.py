"""A real browser clicks through every tab (Debian's Chromium, headless, through Playwright).

Each tab is used the way a person would: import the zoo, compress, make a dataset from a world
style and train a few steps, pick adapters and generate, look at the base. A screenshot of each
tab is saved into docs/ (docs/tab-collection.png, ...) for the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.app.conftest import ZOO_SIZE
from tests.ports import free_port

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]
SLOW = 90_000  # ms: a CPU job on a busy 2-core machine


@dataclass(frozen=True)
class Target:
    """What the served studio holds: the embedded world when shipped, else the tiny pipeline."""

    serve_args: list[str]
    count: int
    first_adapter: str
    adapter: str
    prompt: str = "a red circle on a white background"


def world_target() -> Target | None:
    from studio.bases import world_dir

    loras = sorted(world_dir().glob("loras/*.safetensors"))
    if not (world_dir() / "model_index.json").is_file() or len(loras) < 2:
        return None
    names = [p.stem for p in loras]
    if "noir" in names:
        return Target([], len(names), names[0], "noir", "noirish style, a red circle on a white background")
    return Target([], len(names), names[0], names[0])


@pytest.fixture(scope="module")
def target(tiny_pipeline_dir, tiny_zoo) -> Target:
    return world_target() or Target(["--base", str(tiny_pipeline_dir), "--zoo", str(tiny_zoo)], ZOO_SIZE, "style0", "style1")


@pytest.fixture(scope="module")
def served_workspace(tmp_path_factory) -> Path:
    """The served studio's workspace folder (what it writes can be read back by the test)."""
    return tmp_path_factory.mktemp("browser-workspace")


@pytest.fixture(scope="module")
def served(target, served_workspace, tmp_path_factory):
    """`studio serve` in a subprocess on a free port of 127.0.0.1, with its own workspace."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "studio", "serve", "--port", str(port), "--device", "cpu",
               "--workspace", str(served_workspace), *target.serve_args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"studio serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"studio serve did not answer on {url} within {seconds} s:\n{log.read_text()[-3000:]}")


def browser_page(url: str, profile: Path, viewport: dict[str, int]):
    """Debian's Chromium (headless, own profile) on the served studio, once its title shows;
    skips when Playwright or Chromium is missing. A generator: yields the page, closes after."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test installs it)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: `make test` installs Debian's chromium")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=viewport)
        page = context.new_page()
        page.goto(url)
        page.get_by_text("Adapter Studio").first.wait_for(timeout=SLOW)
        yield page
        context.close()


@pytest.fixture(scope="module")
def page(served, tmp_path_factory):
    yield from browser_page(served, tmp_path_factory.mktemp("chromium-profile"), {"width": 1280, "height": 1000})


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def shoot(page, tab: str) -> Path:
    DOCS.mkdir(exist_ok=True)
    path = DOCS / f"tab-{tab}.png"
    page.wait_for_timeout(1500)  # let images and plots finish drawing
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()
    panel = page.locator(f"#tab-{name.lower()}")
    expect(panel).to_be_visible()
    return panel


def test_collection_tab(page, target):
    panel = open_tab(page, "Collection")
    expect(panel.locator("#collection-summary")).to_contain_text(f"{target.count} adapters", timeout=SLOW)  # the zoo, preloaded
    panel.get_by_role("button", name="Import the zoo").click()
    expect(panel.locator("#collection-table")).to_contain_text(target.first_adapter, timeout=SLOW)
    expect(panel.locator("#collection-summary")).to_contain_text(f"{target.count} adapters")
    shoot(page, "collection")


def test_subspace_tab(page, target):
    panel = open_tab(page, "Subspace")
    panel.get_by_role("button", name="Compress").click()
    expect(panel.locator("#subspace-status")).to_contain_text("Verdict:", timeout=SLOW)  # "Not compressed yet" before
    expect(panel.locator("#subspace-errors")).to_contain_text(target.adapter)
    shoot(page, "subspace")


def render_noir_dataset(panel) -> None:
    """From the Train tab: render 8 images of the world's first style (noir) and wait for its summary."""
    panel.get_by_label("Images", exact=True).fill("8")
    panel.get_by_role("button", name="Render style").click()
    expect(panel.locator("#train-dataset input").first).to_have_value("datasets/world-noir", timeout=SLOW)
    expect(panel.locator("#train-dataset-info")).to_contain_text("8 images", timeout=SLOW)


def test_train_tab(page):
    panel = open_tab(page, "Train")
    render_noir_dataset(panel)
    panel.get_by_label("Run name").fill("browser-lora")
    panel.get_by_label("Steps", exact=True).fill("3")
    panel.get_by_label("Batch size", exact=True).fill("2")
    panel.get_by_label("Sample every").fill("3")
    panel.get_by_label("Sample prompt").fill("noirish style, a red circle")
    panel.get_by_role("button", name="Train", exact=True).click()
    expect(panel.locator("#train-status")).to_contain_text(re.compile(r"step 3 / 3|done after 3 steps"), timeout=SLOW)
    expect(panel).to_contain_text("browser-lora.lora.safetensors", timeout=SLOW)
    expect(panel.locator("#train-samples img").first).to_be_visible()
    shoot(page, "train")


def test_generate_tab(page, target):
    panel = open_tab(page, "Generate")
    chooser = panel.locator("#generate-adapters input").first
    names = ("none", target.adapter, f"{target.adapter}.eigen")
    panel.get_by_label("Prompt", exact=True).fill(target.prompt)
    for name in names:
        chooser.fill(name)
        chooser.press("Enter")
    panel.get_by_text("same-seed comparison grid").click()
    panel.get_by_role("button", name="Generate", exact=True).click()
    expect(panel.locator("#generate-status")).to_contain_text("1 image(s)", timeout=SLOW)
    expect(panel.locator("#generate-images img").first).to_be_visible()
    expect(panel.get_by_label("Parameters (written into each PNG)")).to_have_value(re.compile(re.escape("Grid: " + " | ".join(names))))
    shoot(page, "generate")


def test_base_tab(page):
    panel = open_tab(page, "Base")
    expect(panel.locator("#base-status")).to_contain_text("loaded", timeout=SLOW)
    panel.get_by_label("Folder, file or hub id").fill("../outside")
    panel.get_by_text("a diffusers folder").click()
    panel.get_by_role("button", name="Load base").click()
    expect(page.get_by_text("is not accepted").first).to_be_visible(timeout=SLOW)
    shoot(page, "base")
