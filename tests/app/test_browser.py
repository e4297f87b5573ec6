"""A real browser clicks through every tab (Debian's Chromium, headless, through Playwright).

Each tab is used the way a person would: import the zoo, compress, make a dataset from a world
style and train a few steps, pick adapters and generate, look at the base. A screenshot of each
tab is saved into docs/ (docs/tab-collection.png, ...) for the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync",
]
SLOW = 90_000  # ms: a CPU job on a busy 2-core machine


@pytest.fixture(scope="module")
def page(running_app, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test installs it)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: `make test` installs Debian's chromium")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.goto(running_app.url)
        page.get_by_text("Adapter Studio").first.wait_for(timeout=SLOW)
        yield page
        context.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def shoot(page, tab: str) -> Path:
    DOCS.mkdir(exist_ok=True)
    path = DOCS / f"tab-{tab}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def open_tab(page, name: str):
    page.get_by_role("tab", name=name).click()
    panel = page.locator(f"#tab-{name.lower()}")
    expect(panel).to_be_visible()
    return panel


def test_collection_tab(page):
    panel = open_tab(page, "Collection")
    panel.get_by_role("button", name="Import the zoo").click()
    expect(panel.locator("#collection-table")).to_contain_text("style3", timeout=SLOW)
    expect(panel.locator("#collection-summary")).to_contain_text("adapters")
    shoot(page, "collection")


def test_subspace_tab(page):
    panel = open_tab(page, "Subspace")
    panel.get_by_role("button", name="Compress").click()
    expect(panel.locator("#subspace-status")).to_contain_text("compressed", timeout=SLOW)
    expect(panel.locator("#subspace-errors")).to_contain_text("style0")
    shoot(page, "subspace")


def test_train_tab(page):
    panel = open_tab(page, "Train")
    panel.get_by_role("button", name="Generate from style").click()
    expect(panel.locator("#train-dataset textarea, #train-dataset input").first).to_have_value("datasets/world-noir", timeout=SLOW)
    panel.get_by_label("Run name").fill("browser-lora")
    panel.get_by_label("Steps", exact=True).fill("3")
    panel.get_by_label("Sample every (steps)").fill("3")
    panel.get_by_label("Sample prompt").fill("noirish style, a red circle")
    panel.get_by_role("button", name="Train", exact=True).click()
    expect(panel.locator("#train-status")).to_contain_text("step 3 / 3", timeout=SLOW)
    expect(panel).to_contain_text("browser-lora.lora.safetensors", timeout=SLOW)
    expect(panel.locator("#train-samples img").first).to_be_visible()
    shoot(page, "train")


def test_generate_tab(page):
    panel = open_tab(page, "Generate")
    chooser = panel.locator("#generate-adapters input").first
    for name in ("none", "style0", "style0.eigen"):
        chooser.fill(name)
        chooser.press("Enter")
    panel.get_by_text("same-seed comparison grid").click()
    panel.get_by_role("button", name="Generate", exact=True).click()
    expect(panel.locator("#generate-status")).to_contain_text("1 image(s)", timeout=SLOW)
    expect(panel.locator("#generate-images img").first).to_be_visible()
    expect(panel.get_by_label("Parameters (written into each PNG)")).to_have_value(re.compile(r"Grid: none \| style0 \| style0\.eigen"))
    shoot(page, "generate")


def test_base_tab(page):
    panel = open_tab(page, "Base")
    expect(panel.locator("#base-status")).to_contain_text("loaded", timeout=SLOW)
    panel.get_by_label("Folder, file or hub id").fill("../outside")
    panel.get_by_text("a diffusers folder").click()
    panel.get_by_role("button", name="Load base").click()
    expect(page.get_by_text("is not accepted").first).to_be_visible(timeout=SLOW)
    shoot(page, "base")
