#!/usr/bin/env python3
"""Generate the BrainUNet extension and module icons (128x128 PNG).

The glyph is an axial view of a brain (two hemispheres with a few sulci)
with a glioma drawn as three nested regions, using the same meaning as
the segments the module produces:

* SNFH (oedema)          - yellow, outermost
* ET (enhancing tumour)  - red ring
* NETC (necrotic core)   - dark purple centre

Usage (from the repository root)::

    python Resources/make_icon.py

Requires Pillow. Writes:

* Resources/BrainUNet.png                                   (extension icon)
* BrainUNetSegmentation/Resources/Icons/BrainUNetSegmentation.png (module icon)
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 8  # draw super-sampled, then downscale for anti-aliasing
S = SIZE * SCALE

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [
    REPO_ROOT / "Resources" / "BrainUNet.png",
    REPO_ROOT / "BrainUNetSegmentation" / "Resources" / "Icons" / "BrainUNetSegmentation.png",
]

BRAIN_FILL = (238, 196, 196, 255)
BRAIN_EDGE = (150, 90, 100, 255)
SULCUS = (185, 125, 135, 255)
SNFH = (250, 210, 60, 255)
ET = (220, 40, 40, 255)
NETC = (70, 30, 90, 255)


def p(x: float, y: float) -> tuple[float, float]:
    """Map icon coordinates (0..128) to super-sampled canvas coordinates."""
    return (x * SCALE, y * SCALE)


def box(cx: float, cy: float, rx: float, ry: float) -> list[float]:
    return [(cx - rx) * SCALE, (cy - ry) * SCALE, (cx + rx) * SCALE, (cy + ry) * SCALE]


def blob(cx: float, cy: float, r: float, wobble: float, phase: float, n: int = 90) -> list[tuple[float, float]]:
    """Irregular closed outline, so the tumour does not look like a perfect circle."""
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        rr = r * (1 + wobble * math.sin(3 * t + phase) + 0.5 * wobble * math.sin(5 * t + 2 * phase))
        pts.append(p(cx + rr * math.cos(t), cy + rr * math.sin(t)))
    return pts


def arc_path(points: list[tuple[float, float]], steps: int = 24) -> list[tuple[float, float]]:
    """Quadratic Bezier through (start, control, end) in icon coordinates."""
    (x0, y0), (x1, y1), (x2, y2) = points
    out = []
    for i in range(steps + 1):
        t = i / steps
        x = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * x1 + t ** 2 * x2
        y = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * y1 + t ** 2 * y2
        out.append(p(x, y))
    return out


def draw_icon() -> Image.Image:
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)

    edge_w = int(3.5 * SCALE)
    # Two hemispheres (axial view, anterior at top).
    for cx in (44.5, 83.5):
        d.ellipse(box(cx, 64, 38, 54), fill=BRAIN_FILL, outline=BRAIN_EDGE, width=edge_w)
    # Re-fill the overlap so the outline only shows along the midline fissure.
    d.ellipse(box(64, 64, 20, 50), fill=BRAIN_FILL)
    d.line([p(64, 14), p(64, 114)], fill=BRAIN_EDGE, width=int(3 * SCALE))

    # A few sulci on each hemisphere (mirrored).
    sulci = [
        [(22, 40), (34, 30), (48, 36)],
        [(16, 62), (30, 54), (42, 64)],
        [(20, 86), (34, 80), (46, 92)],
        [(34, 104), (44, 98), (54, 106)],
        [(50, 22), (54, 34), (46, 48)],
    ]
    sw = int(2.6 * SCALE)
    for curve in sulci:
        d.line(arc_path(curve), fill=SULCUS, width=sw, joint="curve")
        mirrored = [(128 - x, y) for x, y in curve]
        d.line(arc_path(mirrored), fill=SULCUS, width=sw, joint="curve")

    # Tumour in the right side of the image: oedema > enhancing rim > necrosis.
    tx, ty = 86, 70
    d.polygon(blob(tx, ty, 25, 0.10, 0.3), fill=SNFH)
    d.polygon(blob(tx, ty, 15, 0.08, 1.7), fill=ET)
    d.polygon(blob(tx + 1, ty, 8, 0.10, 2.9), fill=NETC)

    img = img.filter(ImageFilter.GaussianBlur(radius=SCALE * 0.3))
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    icon = draw_icon()
    for out in OUTPUTS:
        out.parent.mkdir(parents=True, exist_ok=True)
        icon.save(out, format="PNG", optimize=True)
        print(f"wrote {out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
