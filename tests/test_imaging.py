"""The ground floor (unparrot.io, unparrot.imaging) and the text drawing that synth and evaluate share."""

import ast
from pathlib import Path

import numpy as np
from PIL import Image

import unparrot
from unparrot.imaging import typography

SRC = Path(unparrot.__file__).parent
GROUND_FLOOR = ("io", "imaging")
# every stage, and what composes stages: the ground floor is what they stand on, so it imports none of them
STAGES = (
    "ops",
    "engine",
    "curate",
    "synth",
    "evaluate",
    "train",
    "rewrite",
    "demo",
    "cli",
    "ingest",
    "profile",
    "deparrot",
    "report",
)


def imported_modules(source: str, package: str) -> set[str]:
    """Absolute names of every module that `source` (a module of `package`) imports, at the top or inside a
    function, relative imports resolved against `package`."""
    parts = package.split(".")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            if node.module:
                found.add(".".join(base + node.module.split(".")))
            else:  # `from .. import x`: x may be a module of that package
                found.update(".".join(base + [a.name]) for a in node.names)
    return found


def stage_imports(source: str, package: str) -> list[str]:
    """The imports of `source` that reach a stage."""
    names = (m.split(".") for m in imported_modules(source, package))
    return sorted(".".join(p) for p in names if p[0] == "unparrot" and len(p) > 1 and p[1] in STAGES)


def test_ground_floor_imports_no_stage():
    files = [p for floor in GROUND_FLOOR for p in sorted((SRC / floor).rglob("*.py"))]
    assert len(files) >= 8
    bad = {}
    for p in files:
        package = ".".join(["unparrot", *p.relative_to(SRC).parent.parts])
        if found := stage_imports(p.read_text(), package):
            bad[str(p.relative_to(SRC))] = found
    assert not bad, f"the ground floor imports stages: {bad}"


def test_stage_imports_sees_every_import_form():
    """The check above is only as good as its parser: each way of writing an upward import is caught, and
    imports within the ground floor are not."""
    for line in (
        "from ..ops.base import Operator",
        "from .. import curate",
        "import unparrot.synth.render",
        "def f():\n    from ..evaluate import sync",
        "from unparrot.train.data import MEAN",
    ):
        assert stage_imports(line, "unparrot.io"), line
    fine = "import io\nfrom ..pool import Pool\nfrom .decode import open_image\nfrom ..io.tar import iter_samples"
    assert not stage_imports(fine, "unparrot.imaging")
    assert imported_modules(fine, "unparrot.imaging") == {
        "io",
        "unparrot.pool",
        "unparrot.imaging.decode",
        "unparrot.io.tar",
    }


def test_text_quads_cover_the_ink():
    """Ground truth quads must contain what was drawn: render a word on a blank canvas and compare."""
    for angle in (0.0, 12.0, -25.0):
        img = Image.new("RGB", (200, 200), (255, 255, 255))
        quad = typography.draw_text(img, "parrot", "DejaVuSans-Bold.ttf", 30, 40, 60, (0, 0, 0), angle)
        arr = np.asarray(img.convert("L")) < 128
        ys, xs = np.nonzero(arr)
        from matplotlib.path import Path as MPath

        inside = MPath(np.array(quad)).contains_points(np.stack([xs + 0.5, ys + 0.5], 1), radius=3.0)
        assert inside.mean() > 0.97, (angle, inside.mean())
        qx, qy = np.array(quad)[:, 0], np.array(quad)[:, 1]
        assert abs(qx.min() - 40) <= 1.5 and abs(qy.min() - 60) <= 1.5


def test_fit_font_size_fits_the_box():
    size = typography.fit_font_size("a long word", "DejaVuSans.ttf", 64, 60, 40)
    w, h = typography.text_size("a long word", "DejaVuSans.ttf", size)
    assert size < 64 and w <= 60 and h <= 40
    assert typography.fit_font_size("a", "DejaVuSans.ttf", 12, 500, 500) == 12
