"""Training curves of train.py runs as one self-contained SVG: kNN top-1 (and the online linear
probe's top-1 when logged) against epoch; the loss, lr, lambda and EMA momentum against step.
Runs are overlaid, one colour each, named by their folders. Standard library only: SVG is text.

    python plot.py out/quickstart runs/simclr -o curves.svg
"""
import argparse
import json
import math
import os
from xml.sax.saxutils import escape, quoteattr

# (log key, y-axis label, x key): one panel per key that some run logs
PANELS = [("knn_top1", "kNN top-1 (%)", "epoch"),
          ("probe_top1", "online linear probe top-1 (%)", "epoch"),
          ("loss", "loss", "step"), ("lr", "learning rate", "step"),
          ("lam", "lambda (KL weight)", "step"), ("momentum", "EMA momentum", "step")]
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
W, H, COLS = 440, 280, 2  # one panel's size; panels per row
LEFT, RIGHT, TOP, BOTTOM = 75, 15, 15, 45  # the plot area's margins in a panel: ticks, axis labels
ROW = 18  # one legend line


def read_log(path):
    """log.jsonl's records, skipping a line half written when the machine went down."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def extent(values):
    """(low, high) of the values, widened around a constant so that it has a place in the panel."""
    lo, hi = min(values), max(values)
    if lo == hi:
        pad = abs(lo) / 10 or 1
        lo, hi = lo - pad, hi + pad
    return lo, hi


def ticks(lo, hi, min_step=0.0):
    """About 5 round values (1, 2 or 5 times a power of ten apart) inside [lo, hi], as labels."""
    raw = max((hi - lo) / 5, min_step)
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw * (1 - 1e-9))
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    first, last = math.ceil(lo / step), math.floor(hi / step)
    return [(i * step, f"{i * step:.{digits}f}") for i in range(first, last + 1)]


def panel(key, label, xkey, runs, ox, oy):
    """The SVG of one panel with its top-left corner at (ox, oy): frame, ticks, axis labels and one
    polyline per run that logs `key`; [] when none does."""
    series = []  # (colour, run name, [(x, y)] in x order)
    for i, (name, records) in enumerate(runs):
        points = sorted((r[xkey], r[key]) for r in records
                        if xkey in r and key in r and math.isfinite(r[key]))
        if points:
            series.append((COLORS[i % len(COLORS)], name, points))
    if not series:
        return []
    (x0, x1), (y0, y1) = (extent([p[j] for *_, pts in series for p in pts]) for j in (0, 1))
    w, h = W - LEFT - RIGHT, H - TOP - BOTTOM
    left, top = ox + LEFT, oy + TOP
    px = lambda x: left + (x - x0) / (x1 - x0) * w  # noqa: E731  value -> pixel
    py = lambda y: top + h - (y - y0) / (y1 - y0) * h  # noqa: E731  upwards
    out = [f'<g class="panel" data-key="{key}">',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    for v, text in ticks(x0, x1, min_step=1):  # steps and epochs are whole numbers
        x = f"{px(v):.2f}"
        out += [f'<line x1="{x}" y1="{top}" x2="{x}" y2="{top + h}" stroke="#ddd"/>',
                f'<text class="xtick" x="{x}" y="{top + h + 15}" '
                f'text-anchor="middle">{text}</text>']
    for v, text in ticks(y0, y1):
        y = f"{py(v):.2f}"
        out += [f'<line x1="{left}" y1="{y}" x2="{left + w}" y2="{y}" stroke="#ddd"/>',
                f'<text class="ytick" x="{left - 5}" y="{y}" text-anchor="end" '
                f'dominant-baseline="middle">{text}</text>']
    out += [f'<text x="{left + w / 2}" y="{oy + H - 8}" text-anchor="middle">{xkey}</text>',
            f'<text transform="translate({ox + 14},{top + h / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(label)}</text>']
    for colour, name, points in series:
        xy = [(px(x), py(y)) for x, y in points]
        out.append(f'<polyline class="series" data-run={quoteattr(name)} fill="none" '
                   f'stroke="{colour}" stroke-width="1.5" '
                   f'points="{" ".join(f"{x:.2f},{y:.2f}" for x, y in xy)}"/>')
        if xkey == "epoch":  # few points, each an evaluation: marked
            out += [f'<circle cx="{x:.2f}" cy="{y:.2f}" r="2.5" fill="{colour}"/>' for x, y in xy]
    return out + ["</g>"]


def render(runs):
    """The whole SVG: a legend of the runs' names above a grid of panels."""
    top = ROW * len(runs) + 15
    panels = []
    for key, label, xkey in PANELS:
        col, row = len(panels) % COLS, len(panels) // COLS
        drawn = panel(key, label, xkey, runs, col * W, top + row * H)
        if drawn:
            panels.append(drawn)
    width, height = COLS * W, top + H * math.ceil(len(panels) / COLS)
    legend = []
    for i, (name, _) in enumerate(runs):
        y = 15 + ROW * i  # the line's middle
        legend += [f'<rect x="{LEFT}" y="{y - 2}" width="20" height="4" '
                   f'fill="{COLORS[i % len(COLORS)]}"/>',
                   f'<text x="{LEFT + 26}" y="{y}" '
                   f'dominant-baseline="middle">{escape(name)}</text>']
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                      f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
                      f'<rect width="{width}" height="{height}" fill="white"/>',
                      *legend, *(line for drawn in panels for line in drawn), "</svg>", ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Training curves of train.py runs as one SVG.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a train.py --out-dir (holds log.jsonl)")
    parser.add_argument("-o", "--out", default="curves.svg",
                        help="the SVG to write (default: curves.svg)")
    args = parser.parse_args(argv)
    runs = []
    for folder in args.runs:
        path = os.path.join(folder, "log.jsonl")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} not found: {folder} is not a train.py --out-dir")
        records = [r for r in read_log(path)
                   if isinstance(r, dict) and any(k in r for k, *_ in PANELS)]
        if not records:
            raise SystemExit(f"error: {path} holds no step or kNN records")
        runs.append(records)
    names = [os.path.basename(os.path.abspath(folder)) for folder in args.runs]
    if len(set(names)) < len(names):  # folders of the same name: their paths tell them apart
        names = [os.path.normpath(folder) for folder in args.runs]
    try:
        with open(args.out, "w") as f:
            f.write(render(list(zip(names, runs))))
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.out}: {e.strerror}")
    print(f"wrote {args.out}: {len(runs)} run(s)")


if __name__ == "__main__":
    main()
