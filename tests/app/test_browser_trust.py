"""What a kohya_ss / A1111 user must be able to trust (issue 18), in a real browser.

Debian's Chromium (headless, through Playwright) against a real `studio serve` on the embedded
world, one workspace for the whole module. The first server is used the way a person would:
pick another base, import a file, compress, render a dataset and train 3 steps; a huge width and
a huge rank are refused on the page before any work; a 200-step generation and a long training
run stop on Interrupt / Stop and the next short generation works; a kohya zip keeps its repeat
folders; the app's own outputs import and say what they are. Then the server is killed (the page
says the connection is lost), a second `studio serve` starts on the same workspace without
naming a base, and everything is found again. Last, each tab at 1280 and 390 px wide: the
screenshots go to docs/ (tab-NAME.png, tab-NAME-390.png) and nothing is wider than a phone.

The tests of this module run in order and build on each other (one served workspace).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.app.test_browser import DOCS, REPO, SLOW, browser_page, expect, open_tab, render_noir_dataset, wait_until_up
from tests.app.test_trust import kohya_zip
from tests.ports import free_port

pytestmark = pytest.mark.browser

RUN, LONG_RUN = "browser-run", "long-run"
BASE_COPY = "world-copy"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 1000}
OVERFLOW_SLACK = 2  # px: sub-pixel rounding
TABS = ["Collection", "Subspace", "Train", "Generate", "Base"]


class Server:
    """`studio serve` in a subprocess on one port and one workspace; killed and started again."""

    def __init__(self, workspace: Path, logs: Path):
        self.workspace, self.logs, self.port = workspace, logs, free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Serve the workspace with no --base: a new workspace starts on the world, a used one on its last base."""
        self.starts += 1
        log = self.logs / f"serve-{self.starts}.log"
        command = [sys.executable, "-m", "studio", "serve", "--port", str(self.port), "--device", "cpu", "--workspace", str(self.workspace)]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        with log.open("w") as sink:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=environment)
        wait_until_up(self.url, self.process, log)

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a power cut would: nothing gets to save on the way out."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A new workspace holding a second base: a copy of the world under bases/ (as a user's SD model would be)."""
    from studio.bases import world_dir

    if not (world_dir() / "model_index.json").is_file():
        pytest.skip("the embedded world is not shipped in this checkout")
    root = tmp_path_factory.mktemp("trust-browser-workspace")
    shutil.copytree(world_dir(), root / "bases" / BASE_COPY, ignore=shutil.ignore_patterns("loras"))
    return root


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    served = Server(workspace, tmp_path_factory.mktemp("trust-serve"))
    served.start()
    yield served
    served.kill()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    yield from browser_page(server.url, tmp_path_factory.mktemp("trust-chromium"), DESKTOP)


def toast(page, text: str):
    """The error toast that says ``text`` (visible), then every toast closed so none covers a button."""
    message = page.locator(".toast-body").filter(has_text=text).first
    expect(message).to_be_visible(timeout=SLOW)
    said = message.inner_text()
    for close in page.locator(".toast-close").all():
        if close.is_visible():
            close.click()
    return said


def pick(panel, label: str, value: str) -> None:
    """Type a value into a dropdown and take it (allow_custom_value dropdowns accept it as typed)."""
    field = panel.get_by_label(label, exact=True).first
    field.fill(value)
    field.press("Enter")


def search(panel, query: str):
    """The collection table filtered by the search box (the table draws only the rows in view)."""
    panel.locator("#collection-search").get_by_role("textbox").fill(query)
    return panel.locator("#collection-table")


def upload(panel, elem_id: str, files: list[Path]) -> None:
    """Put files into an upload field (emptied first) and wait until each is uploaded (its row links to the server's copy)."""
    field = panel.locator(f"#{elem_id}")
    clear = field.get_by_role("button", name="Clear")
    if clear.count():
        clear.click()
        expect(field.get_by_role("row")).to_have_count(0)
    field.locator("input[type=file]").set_input_files([str(f) for f in files])
    expect(field.get_by_role("row").filter(has=field.page.get_by_role("link"))).to_have_count(len(files), timeout=SLOW)


def outputs(workspace: Path) -> set[Path]:
    return set((workspace / "outputs").glob("*.png"))


# ---------------------------------------------------------------- the first server: a session of work


def test_pick_another_base(page):
    panel = open_tab(page, "Base")
    panel.get_by_text("a diffusers folder").click()
    pick(panel, "Folder, file or hub id", f"bases/{BASE_COPY}")
    panel.get_by_role("button", name="Load base").click()
    expect(panel.locator("#base-status")).to_contain_text(f"Base {BASE_COPY} (loaded", timeout=SLOW)


def test_import_a_file(page, tmp_path):
    from studio.bases import world_dir

    mine = shutil.copyfile(world_dir() / "loras" / "noir.safetensors", tmp_path / "mine.safetensors")
    panel = open_tab(page, "Collection")
    upload(panel, "collection-uploads", [mine])
    panel.get_by_role("button", name="Import uploaded files").click()
    expect(panel.locator("#collection-summary")).to_contain_text("mine.safetensors: LoRA file mine", timeout=SLOW)
    expect(search(panel, "mine")).to_contain_text("LoRA file", timeout=SLOW)
    search(panel, "")


def test_compress(page):
    from studio.bases import world_dir

    zoo = len(list((world_dir() / "loras").glob("*.safetensors")))
    panel = open_tab(page, "Subspace")
    panel.get_by_role("button", name="Compress").click()
    expect(panel.locator("#subspace-status")).to_contain_text("Verdict:", timeout=SLOW)
    expect(panel.locator("#subspace-status")).to_contain_text(f"{zoo + 1} adapters in collection.safetensors")  # the zoo and mine


def test_render_a_dataset_and_train_three_steps(page):
    panel = open_tab(page, "Train")
    render_noir_dataset(panel)
    panel.get_by_label("Run name").fill(RUN)
    panel.get_by_label("Steps", exact=True).fill("3")
    panel.get_by_label("Batch size", exact=True).fill("2")
    panel.get_by_label("Sample prompt").fill("noirish style, a red circle")
    panel.get_by_role("button", name="Train", exact=True).click()
    expect(panel.locator("#train-status")).to_contain_text("done after 3 steps", timeout=SLOW)
    expect(panel.locator("#train-status")).to_contain_text(f"{RUN}.lora.safetensors joined the collection")


# ---------------------------------------------------------------- refused before any work


def test_a_huge_width_is_refused_on_the_page(page, workspace):
    before = outputs(workspace)
    panel = open_tab(page, "Generate")
    panel.get_by_label("Width", exact=True).fill("100000")
    panel.get_by_label("Steps", exact=True).fill("200")
    panel.get_by_role("button", name="Generate", exact=True).click()
    said = toast(page, "width = 100000")
    assert "above the cap of 8192 px" in said and "limits.max_side" in said
    expect(panel.locator("#generate-status")).not_to_contain_text("image(s)")
    assert outputs(workspace) == before
    panel.get_by_label("Width", exact=True).fill("0")


def test_a_huge_rank_is_refused_on_the_page(page, workspace):
    panel = open_tab(page, "Train")
    panel.get_by_label("Run name").fill("huge-rank")
    panel.get_by_label("rank", exact=True).filter(visible=True).fill("100000")
    panel.get_by_label("rank", exact=True).filter(visible=True).press("Tab")
    expect(panel.locator("#train-knobs")).to_contain_text("100000")
    panel.get_by_role("button", name="Train", exact=True).click()
    said = toast(page, "rank = 100000")
    assert "must be <= 1024" in said
    assert not (workspace / "runs" / "huge-rank").exists()
    panel.get_by_label("rank", exact=True).filter(visible=True).fill("8")
    panel.get_by_label("rank", exact=True).filter(visible=True).press("Tab")
    expect(panel.locator("#train-knobs")).not_to_contain_text("100000")


# ---------------------------------------------------------------- Interrupt and Stop give control back


def generate_once(page) -> None:
    """A short generation that must finish: the server is not stuck behind what was stopped."""
    panel = open_tab(page, "Generate")
    panel.get_by_label("Steps", exact=True).fill("2")
    panel.get_by_role("button", name="Generate", exact=True).click()
    expect(panel.locator("#generate-status")).to_contain_text("1 image(s)", timeout=SLOW)


def test_interrupt_a_long_generation(page, workspace):
    before = outputs(workspace)
    panel = open_tab(page, "Generate")
    panel.get_by_label("Steps", exact=True).fill("200")
    panel.get_by_role("button", name="Generate", exact=True).click()
    expect(panel.locator("#generate-status")).to_contain_text(re.compile(r"denoising: step \d+ / 200"), timeout=SLOW)
    panel.locator("#generate-interrupt").click()
    expect(panel.locator("#generate-interrupt-note")).to_contain_text("interrupting at the next denoising step", timeout=SLOW)
    expect(panel.locator("#generate-status")).to_contain_text(re.compile(r"Interrupted at step \d+ / 200; nothing was saved"), timeout=SLOW)
    assert outputs(workspace) == before
    generate_once(page)


def test_stop_a_long_training_run(page, workspace):
    panel = open_tab(page, "Train")
    pick(panel, "Dataset folder (in the workspace)", "datasets/world-noir")
    panel.get_by_label("Run name").fill(LONG_RUN)
    panel.get_by_label("Steps", exact=True).fill("5000")
    panel.get_by_label("Batch size", exact=True).fill("1")
    panel.get_by_role("button", name="Train", exact=True).click()
    expect(panel.locator("#train-status")).to_contain_text(re.compile(r"step [1-9]\d* / 5000"), timeout=SLOW)
    panel.get_by_role("button", name="Stop", exact=True).click()
    expect(panel.locator("#train-stop-note")).to_contain_text("stopping after the current step", timeout=SLOW)
    expect(panel.locator("#train-status")).to_contain_text("stopped after", timeout=SLOW)
    assert (workspace / "runs" / LONG_RUN / "checkpoints" / "latest").is_file()  # resumable
    generate_once(page)


# ---------------------------------------------------------------- a kohya zip


def test_a_kohya_zip_keeps_its_repeats(page, tmp_path):
    archive = kohya_zip(tmp_path / "mychar.zip", characters=6, styles=4)
    panel = open_tab(page, "Train")
    panel.get_by_text("Upload a zip").click()
    upload(panel, "train-archive", [archive])
    panel.get_by_label("Dataset name").fill("kohya-browser")
    panel.get_by_role("button", name="Upload dataset").click()
    info = panel.locator("#train-dataset-info")
    expect(info).to_contain_text("10 images: 9 train, 1 held out for validation (split 0.1)", timeout=SLOW)
    expect(info).to_contain_text("5_mychar: 5 repeats, trigger word mychar")
    expect(info).to_contain_text("2_inkstyle: 2 repeats, trigger word inkstyle")
    expect(panel.locator("#train-preview")).to_contain_text("mychar, a red square (x5)")
    expect(panel.locator("#train-preview")).to_contain_text("(x2)")
    pick(panel, "Folder", "2_inkstyle")
    panel.get_by_label("Repeats per epoch").fill("3")
    panel.get_by_role("button", name="Set repeats").click()
    expect(info).to_contain_text("3_inkstyle: 3 repeats, trigger word inkstyle", timeout=SLOW)
    expect(info).to_contain_text("5_mychar: 5 repeats")


# ---------------------------------------------------------------- the app's own outputs


def test_the_apps_own_outputs_import_and_say_what_they_are(page, workspace, tmp_path):
    run = workspace / "runs" / RUN
    best = tmp_path / "best"
    best.mkdir()
    shutil.copyfile(run / "best" / "adapter.safetensors", best / "adapter.safetensors")
    with zipfile.ZipFile(workspace / "compressed" / "collection.zip") as bundle:
        (tmp_path / "noir.reconstructed.safetensors").write_bytes(bundle.read("reconstructions/noir.reconstructed.safetensors"))
    files = [run / "adapter.safetensors", best / "adapter.safetensors", workspace / "compressed" / "collection.safetensors",
             tmp_path / "noir.reconstructed.safetensors"]
    panel = open_tab(page, "Collection")
    upload(panel, "collection-uploads", files)
    panel.get_by_role("button", name="Import uploaded files").click()
    summary = panel.locator("#collection-summary")
    expect(summary).to_contain_text(f"adapter.safetensors: trained (lora) {RUN} (studio", timeout=SLOW)
    expect(summary).to_contain_text(f"adapter-1.safetensors: trained (lora) {RUN}-best (studio")
    expect(summary).to_contain_text("best checkpoint: step")
    expect(summary).to_contain_text(re.compile(r"collection\.safetensors: a compressed collection of \d+ adapters; in Generate as"))
    expect(summary).to_contain_text("noir.reconstructed.safetensors: reconstruction noir.reconstructed (kohya")
    expect(summary).to_contain_text("reconstructed from the compressed collection collection.safetensors (relative error")
    table = search(panel, "reconstruction")
    expect(table).to_contain_text("noir.reconstructed", timeout=SLOW)
    expect(table).not_to_contain_text("blueprint")
    table = search(panel, RUN)
    for name in (RUN, f"{RUN}-best", f"{RUN}.lora"):
        expect(table).to_contain_text(name, timeout=SLOW)
    pick(panel, "Details of", "noir.reconstructed")
    expect(panel.locator("#collection-details")).to_contain_text("studio.reconstructed_from", timeout=SLOW)
    search(panel, "")


# ---------------------------------------------------------------- killed, started again: all back


def test_a_killed_server_is_noticed_and_a_restart_finds_everything(page, server):
    panel = open_tab(page, "Collection")
    expect(panel.locator("#collection-table")).to_contain_text("blueprint", timeout=SLOW)
    before = panel.locator("#collection-summary strong").first.inner_text()  # "N adapters"
    server.kill()
    expect(page.locator("#backend-lost")).to_contain_text("Lost the connection to the studio server", timeout=SLOW)
    server.start()
    expect(page.locator("#backend-lost")).to_contain_text("answers again", timeout=SLOW)
    page.reload()
    page.get_by_text("Adapter Studio").first.wait_for(timeout=SLOW)
    panel = open_tab(page, "Collection")
    summary = panel.locator("#collection-summary")
    expect(summary).to_contain_text(before, timeout=SLOW)
    expect(summary).to_contain_text(f"on base {BASE_COPY}")
    expect(summary).to_contain_text("restored")
    for name in (f"{RUN}.lora", f"{RUN}-best", "mine", "noir.eigen", "mine.eigen", "noir.reconstructed", "blueprint"):
        expect(search(panel, name)).to_contain_text(name, timeout=SLOW)
    search(panel, "")
    base = open_tab(page, "Base")
    expect(base.locator("#base-status")).to_contain_text(f"Base {BASE_COPY} (loaded", timeout=SLOW)
    expect(base.get_by_label("a diffusers folder")).to_be_checked()  # the picker shows what was restored
    expect(base.get_by_label("Folder, file or hub id", exact=True)).to_have_value(f"bases/{BASE_COPY}")
    subspace = open_tab(page, "Subspace")
    expect(subspace.locator("#subspace-status")).to_contain_text("Verdict:", timeout=SLOW)
    train = open_tab(page, "Train")
    train.locator("#train-runs input").first.click()
    expect(page.get_by_role("option", name=f"{RUN} — done, 3/3 steps")).to_be_visible(timeout=SLOW)
    expect(page.get_by_role("option", name=f"{LONG_RUN} — stopped")).to_be_visible()
    page.keyboard.press("Escape")
    train.locator("#train-dataset input").first.click()
    for dataset in ("datasets/world-noir", "datasets/kohya-browser"):
        expect(page.get_by_role("option", name=dataset)).to_be_visible(timeout=SLOW)
    page.keyboard.press("Escape")


# ---------------------------------------------------------------- each tab at 1280 and 390 px


def fill_for_the_pictures(page) -> None:
    """What the screenshots show: a run's loss and samples, a labelled same-seed grid."""
    train = open_tab(page, "Train")
    train.locator("#train-dataset input").first.click()
    page.get_by_role("option", name="datasets/world-noir").click()
    expect(train.locator("#train-dataset-info")).to_contain_text("8 images", timeout=SLOW)
    train.locator("#train-runs input").first.click()
    page.get_by_role("option", name=f"{RUN} — done").click()
    expect(train.locator("#train-run-info")).to_contain_text(f"{RUN} (lora): done", timeout=SLOW)
    generate = open_tab(page, "Generate")
    generate.get_by_label("Prompt", exact=True).fill("noirish style, a red circle on a white background")
    chooser = generate.locator("#generate-adapters input").first
    for name in ("none", "noir", "noir.eigen"):
        chooser.fill(name)
        chooser.press("Enter")
    generate.get_by_text("same-seed comparison grid").click()
    generate.get_by_label("Steps", exact=True).fill("20")
    generate.get_by_role("button", name="Generate", exact=True).click()
    expect(generate.locator("#generate-status")).to_contain_text("1 image(s)", timeout=SLOW)


def shoot(page, name: str, suffix: str = "") -> Path:
    DOCS.mkdir(exist_ok=True)
    path = DOCS / f"tab-{name.lower()}{suffix}.png"
    for close in page.locator(".toast-close").all():  # no stale message over the picture
        if close.is_visible():
            close.click()
    page.wait_for_timeout(1000)  # let images and plots finish drawing (a picture, not an assertion)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_each_tab_at_1280_and_390_px(page):
    fill_for_the_pictures(page)
    wide = {}
    for name in TABS:
        open_tab(page, name)
        shoot(page, name)
        wide[name] = page.evaluate("document.scrollingElement.scrollWidth")
    expect(page.locator("#train-runs input").first).to_have_value(re.compile(f"^{RUN} — done"), timeout=SLOW)  # kept across tab switches
    page.set_viewport_size(PHONE)
    try:
        overflow = {}
        for name in TABS:
            open_tab(page, name)
            page.wait_for_timeout(300)  # the layout settles after the tab switch (a picture, not an assertion)
            overflow[name] = page.evaluate("document.scrollingElement.scrollWidth")
            shoot(page, name, "-390")
    finally:
        page.set_viewport_size(DESKTOP)
    assert all(width <= DESKTOP["width"] + OVERFLOW_SLACK for width in wide.values()), wide
    assert all(width <= PHONE["width"] + OVERFLOW_SLACK for width in overflow.values()), overflow
