"""The table and the plots of bench/growth.sh: time and peak memory against the number of files.

Usage: growth_plot.py RESULTS OUTDIR   (writes OUTDIR/growth-time.svg and growth-memory.svg; plain
SVG, no plotting library)
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

COLOURS = {"keepwell": "#1f6feb", "restic": "#d1242f"}
STEPS = {"backup": "first backup", "rebackup": "unchanged re-backup", "restore": "restore"}


def load(path: str) -> dict[tuple[str, str, str], list[tuple[int, float, float, float]]]:
    series: dict[tuple[str, str, str], list[tuple[int, float, float, float]]] = defaultdict(list)
    for line in open(path):
        tree, files, tool, step, secs, rss, pss = line.split()
        series[(tree, tool, step)].append((int(files), float(secs), int(rss) / 1024,
                                           int(pss) / 1024))
    for points in series.values():
        points.sort()
    return series


def table(series: dict[tuple[str, str, str], list[tuple[int, float, float, float]]]) -> str:
    rows = ["| tree | files | step | keepwell s | restic s | keepwell/restic "
            "| peak RSS MiB keepwell / restic | peak PSS MiB keepwell / restic |",
            "|---|---|---|---|---|---|---|---|"]
    for tree in ("mixed", "dirs"):
        for step, label in STEPS.items():
            kw = series.get((tree, "keepwell", step), [])
            rs = {p[0]: p for p in series.get((tree, "restic", step), [])}
            for files, secs, rss, pss in kw:
                r = rs.get(files)
                if r is None:
                    continue
                name = "10,000 dirs x 100" if tree == "dirs" else "varied dirs"
                rows.append(f"| {name} | {files:,} | {label} | {secs:.1f} | {r[1]:.1f} | "
                            f"{secs / r[1]:.2f} | {rss:.0f} / {r[2]:.0f} | {pss:.0f} / {r[3]:.0f} |")
    return "\n".join(rows)


def ticks(top: float) -> list[float]:
    """Round tick values from 0 to at least ``top`` (4 to 8 of them)."""
    import math

    top = max(top, 1e-9)
    base = 10 ** math.floor(math.log10(top / 4))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if top / (m * base) <= 7)
    return [step * k for k in range(math.ceil(top / step) + 1)]


def tick_label(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def svg(series: dict[tuple[str, str, str], list[tuple[int, float, float, float]]], field: int,
        unit: str, title: str) -> str:
    w, h, pad, gap = 300, 220, 48, 24
    width = 3 * w + 2 * gap + 2 * pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 2 * pad + 20}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{pad}" y="18" font-size="14" font-weight="bold">{title}</text>']
    xt = ticks(max((p[0] for k, pts in series.items() for p in pts), default=1))
    max_files = xt[-1]
    for i, (step, label) in enumerate(STEPS.items()):
        x0, y0 = pad + i * (w + gap), pad
        pts = {t: series.get(("mixed", t, step), []) for t in COLOURS}
        extra = {t: series.get(("dirs", t, step), []) for t in COLOURS}
        yt = ticks(max([p[field] for v in (*pts.values(), *extra.values()) for p in v] + [1e-9]))
        ymax = yt[-1]
        out.append(f'<text x="{x0}" y="{y0 - 8}" font-weight="bold">{label}</text>')
        out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#888"/>')
        for yv in yt:
            y = y0 + h - h * yv / ymax
            out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{tick_label(yv)}</text>')
        for xv in xt:
            x = x0 + w * xv / max_files
            out.append(f'<text x="{x:.1f}" y="{y0 + h + 14}" text-anchor="middle">'
                       f'{tick_label(xv)}</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{y0 + h + 30}" text-anchor="middle">files</text>')
        out.append(f'<text x="{x0 - 36}" y="{y0 + h / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 {x0 - 36} {y0 + h / 2})">{unit}</text>')

        def xy(p: tuple[int, float, float, float]) -> tuple[float, float]:
            return x0 + w * p[0] / max_files, y0 + h - h * p[field] / ymax

        for tool, colour in COLOURS.items():
            if pts[tool]:
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(xy, pts[tool]))
                out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                           'stroke-width="2"/>')
                for x, y in map(xy, pts[tool]):
                    out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
            for x, y in map(xy, extra[tool]):  # the 10,000 x 100 tree: a hollow square
                out.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" '
                           f'fill="none" stroke="{colour}" stroke-width="2"/>')
    ly = h + 2 * pad + 8
    for j, (tool, colour) in enumerate(COLOURS.items()):
        lx = pad + j * 110
        out.append(f'<line x1="{lx}" x2="{lx + 20}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{lx + 24}" y="{ly + 4}">{tool}</text>')
    out.append(f'<text x="{pad + 230}" y="{ly + 4}">square: 10,000 directories of 100 files; '
               'line: directories of varied sizes</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    series = load(sys.argv[1])
    outdir = sys.argv[2]
    print(table(series))
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "growth-time.svg"), "w") as f:
        f.write(svg(series, 1, "seconds", "Time against the number of files (page cache dropped)"))
    with open(os.path.join(outdir, "growth-memory.svg"), "w") as f:
        f.write(svg(series, 3, "MiB (PSS)", "Peak memory of the process tree (PSS)"))
    print(f"\nplots: {outdir}/growth-time.svg, {outdir}/growth-memory.svg")


if __name__ == "__main__":
    main()
