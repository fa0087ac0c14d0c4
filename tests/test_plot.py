"""plot.py: the SVG parses, holds one polyline per run and series, and its points read back
through the panels' tick labels give the logged values; bad folders stop with one line."""
import json
import math
import os
import xml.etree.ElementTree as ET

import pytest

import plot
from test_train import CARL, read_log, run_main

SVG = "{http://www.w3.org/2000/svg}"


def linear(ticks):
    """Pixel -> value from one axis's tick labels [(pixel, value)], after checking that every label
    lies on the line through the first and the last."""
    (p0, v0), (p1, v1) = ticks[0], ticks[-1]
    f = lambda p: v0 + (p - p0) * (v1 - v0) / (p1 - p0)  # noqa: E731
    for p, v in ticks:
        assert f(p) == pytest.approx(v, abs=1e-4 * abs(v1 - v0))
    return f


def curves(path):
    """{(panel key, run name): [(x, y)]} in the logged values' units, read back from the SVG."""
    out = {}
    for g in ET.parse(path).getroot().iter(SVG + "g"):
        assert g.get("class") == "panel"
        texts = list(g.iter(SVG + "text"))
        tick = lambda axis: [(float(t.get(axis)), float(t.text))  # noqa: E731
                             for t in texts if t.get("class") == axis + "tick"]
        fx, fy = linear(tick("x")), linear(tick("y"))
        assert {"epoch", "step"} & {t.text for t in texts}  # the x axis's label
        pixels = []
        for line in g.iter(SVG + "polyline"):
            key = (g.get("data-key"), line.get("data-run"))
            assert key not in out, key  # one polyline per run and series
            points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
            out[key] = [(fx(x), fy(y)) for x, y in points]
            pixels += points
        # the runs' extremes span the frame: first and last x at its sides, lowest and highest y
        frame = next(g.iter(SVG + "rect"))
        left, top = float(frame.get("x")), float(frame.get("y"))
        right, bottom = left + float(frame.get("width")), top + float(frame.get("height"))
        assert fx(right) > fx(left) and fy(top) > fy(bottom)  # values grow rightwards and upwards
        xs, ys = [x for x, _ in pixels], [y for _, y in pixels]
        if len(set(xs)) > 1:
            assert (min(xs), max(xs)) == pytest.approx((left, right), abs=0.01)
        if len(set(ys)) > 1:
            assert (max(ys), min(ys)) == pytest.approx((bottom, top), abs=0.01)
    return out


def assert_maps_back(drawn, runs):
    """Each drawn series holds its run's logged (x, y) pairs in x order, to a pixel's rounding."""
    for (key, name), points in drawn.items():
        xkey = {"knn_top1": "epoch", "probe_top1": "epoch"}.get(key, "step")
        logged = sorted((r[xkey], r[key]) for r in runs[name] if key in r)
        ys = [r[key] for records in runs.values() for r in records if key in r]
        tol = 1e-3 * (max(ys) - min(ys) or abs(ys[0]) or 1)
        assert [x for x, _ in points] == pytest.approx([x for x, _ in logged], abs=1e-2), key
        assert [y for _, y in points] == pytest.approx([y for _, y in logged], abs=tol), (key, name)


def write_log(folder, records, tail=""):
    os.makedirs(folder)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def test_hand_written_runs_map_back(tmp_path):
    """Two runs: kNN and probe at epochs, loss, lr and lambda (one run) or momentum (the other) at
    steps; a half-written last line is skipped."""
    runs = {}
    for name, n, extra in (("carl", 12, "lam"), ("byol", 18, "momentum")):
        records = []
        for s in range(n):
            if s % 6 == 0:
                records.append({"epoch": s // 6, "step": s, "knn_top1": 20 + 3 * s + n,
                                "probe_top1": 25 + 2 * s})
            records.append({"epoch": s // 6, "step": s, "loss": 4 * math.exp(-s / 7) + n / 10,
                            "lr": 0.3 * (1 + math.cos(math.pi * s / n)), extra: 0.99 + s / 1000,
                            "img_per_s": 500.0})
        write_log(tmp_path / name, records, tail='{"epoch": 3, "step": 18, "lo')
        runs[name] = records
    out = str(tmp_path / "c.svg")
    plot.main([str(tmp_path / "carl"), str(tmp_path / "byol"), "-o", out])
    drawn = curves(out)
    assert set(drawn) == {(k, name) for k in ("knn_top1", "probe_top1", "loss", "lr")
                          for name in runs} | {("lam", "carl"), ("momentum", "byol")}
    assert_maps_back(drawn, runs)
    legend = {t.text for t in ET.parse(out).getroot().iter(SVG + "text")}
    assert {"carl", "byol"} <= legend


def test_a_train_run_maps_back(tmp_path, monkeypatch):
    """A real train.py log (2 epochs, kNN at every epoch), plotted to the default curves.svg."""
    out = str(tmp_path / "run")
    run_main([*CARL, "--knn-every", "1", "--knn-train-subset", "100", "--knn-test-subset", "50",
              "--out-dir", out])
    monkeypatch.chdir(tmp_path)
    plot.main([out])
    drawn = curves(tmp_path / "curves.svg")
    assert set(drawn) == {(k, "run") for k in ("knn_top1", "loss", "lr", "lam")}
    assert len(drawn["knn_top1", "run"]) == 3 and len(drawn["loss", "run"]) == 6
    assert_maps_back(drawn, {"run": read_log(out)})


def test_bad_folders_stop_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: .*nothing/log.jsonl not found"):
        plot.main([str(tmp_path / "nothing")])
    write_log(tmp_path / "empty", [], tail='{"epoch": 0, "st')  # one half-written line only
    with pytest.raises(SystemExit, match=r"^error: .*empty/log.jsonl holds no step or kNN records"):
        plot.main([str(tmp_path / "empty")])
