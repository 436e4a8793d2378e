import os
import shutil

import pytest

from unparrot.profile import profile
from unparrot.report import SECTIONS, register_section, report
from unparrot.report.html import Section

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():
    if CHROMIUM is None:
        if os.environ.get("UNPARROT_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (make test installs Debian's chromium package)")
        pytest.skip("chromium not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright, CHROMIUM


def open_in_chromium(html_path, screenshot):
    """Load a page in headless Chromium; return console errors/page errors and per-image load state."""
    sync_playwright, exe = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=exe,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems = []
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(f"file://{html_path}")
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2,h3')).map(h => h.textContent)")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return problems, images, headings


@pytest.mark.browser
def test_profile_report_renders_in_chromium(synth_pool, tmp_path):
    pool = shutil.copytree(synth_pool, tmp_path / "p")
    profile(pool, backend="oracle", workers=1, progress=False)
    path = report(pool)
    html = path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    problems, images, headings = open_in_chromium(path, tmp_path / "report.png")
    assert problems == []
    assert len(images) >= 20 and all(ok and w > 0 for ok, w in images)
    assert any("Profile" in h for h in headings)
    assert any("High CoTR" in h for h in headings) and any("No text found" in h for h in headings)
    assert (tmp_path / "report.png").stat().st_size > 20000


def test_sections_are_pluggable(synth_pool, tmp_path):
    pool = shutil.copytree(synth_pool, tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="profile"):
        report(pool)  # nothing computed yet
    register_section("custom", lambda ctx: Section("custom", "My section", "<p>hello</p>"))
    try:
        path = report(pool, sections=["custom"])
        assert "My section" in path.read_text()
    finally:
        del SECTIONS["custom"]
    with pytest.raises(KeyError):
        report(pool, sections=["nope"])


@pytest.mark.browser
def test_curation_sections_render_in_chromium(synth_pool, tmp_path):
    """CLIP score, clusters and funnels (with what each recipe removed) after a real embed/cluster/select."""
    from unparrot.curate.cluster import cluster
    from unparrot.curate.select import select
    from unparrot.engine import run_stage

    pool = shutil.copytree(synth_pool, tmp_path / "p")
    profile(pool, backend="oracle", workers=1, progress=False)
    run_stage(pool, "embed", {"model": "unparrot-rn-tiny", "masked": True}, progress=False)  # random weights
    cluster(pool, k=4, niter=5, progress=False)
    for r in ("less-is-more", "t-mars", "cotr"):
        select(pool, r)
    select(pool, "parrot-debiased", overrides={"min_clip_score": -1.0})
    path = report(pool, sections=["clip", "clusters", "funnel"])
    problems, images, headings = open_in_chromium(path, tmp_path / "curation.png")
    assert problems == []
    assert {"CLIP scores", "Clusters and near-duplicates", "Selection funnels"} <= set(headings)
    assert {"less-is-more", "t-mars", "cotr", "parrot-debiased"} <= set(headings)
    assert "What each recipe removed (random examples)" in headings
    assert len(images) >= 10 and all(ok and w > 0 for ok, w in images)


def test_verdict_plot_shows_measured_findings_only():
    from unparrot.report.results_section import verdict_plot

    claim = {"direction": "+", "margin": 0.0}
    fs = [{"id": "a", "verdict": "holds", "estimate": 0.1, "low": 0.05, "high": 0.15, "claim": claim},
          {"id": "b", "verdict": "inconclusive", "estimate": 0.0, "low": -0.02, "high": 0.03,
           "claim": {"direction": "0", "margin": 0.03}},
          {"id": "c", "verdict": "not run"}]
    tag = verdict_plot(fs)
    assert tag.startswith("<img") and "base64" in tag
    assert verdict_plot([{"id": "c", "verdict": "not run"}]) is None
