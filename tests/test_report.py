import shutil

import pytest

from unparrot.profile import profile
from unparrot.report import SECTIONS, register_section, report
from unparrot.report.html import Section
from helpers import open_in_chromium


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
    fs = [
        {"id": "a", "verdict": "holds", "estimate": 0.1, "low": 0.05, "high": 0.15, "claim": claim},
        {
            "id": "b",
            "verdict": "inconclusive",
            "estimate": 0.0,
            "low": -0.02,
            "high": 0.03,
            "claim": {"direction": "0", "margin": 0.03},
        },
        {"id": "c", "verdict": "not run"},
    ]
    tag = verdict_plot(fs)
    assert tag.startswith("<img") and "base64" in tag
    assert verdict_plot([{"id": "c", "verdict": "not run"}]) is None
