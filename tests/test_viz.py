"""Tests of depthg.lab.viz: conversions against hand computation, figures built headless, files written."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from depthg.lab import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_make_palette_distinct_and_deterministic():
    a, b = viz.make_palette(40), viz.make_palette(40)
    assert a.shape == (40, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert len({tuple(c) for c in a}) == 40


def test_cityscapes_palette_official_colours():
    pal = viz.get_palette("cityscapes")
    assert pal.shape[0] >= 27
    # class 0 = label id 7 "road" (128, 64, 128); class 19 = id 26 "car" (0, 0, 142) in cityscapesscripts
    assert tuple(pal[0]) == (128, 64, 128)
    assert tuple(pal[26 - 7]) == (0, 0, 142)


def test_get_palette_extends_to_n_classes():
    pal = viz.get_palette(3, n_classes=8)
    assert pal.shape == (8, 3)


def test_colorize_labels_and_ignore():
    pal = np.array([[10, 20, 30], [200, 100, 0]], dtype=np.uint8)
    lab = torch.tensor([[0, 1], [-1, 1]])
    out = viz.colorize_labels(lab, pal, ignore_color=(1, 2, 3))
    assert out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 1]) == (200, 100, 0)
    assert tuple(out[1, 0]) == (1, 2, 3)
    with pytest.raises(ValueError, match="no colour"):
        viz.colorize_labels(np.array([[2]]), pal)


def test_overlay_alpha_blend_by_hand():
    img = torch.full((3, 2, 2), 0.5)
    pal = np.array([[255, 0, 0]], dtype=np.uint8)
    lab = np.array([[0, -1], [0, 0]])
    out = viz.overlay_labels(img, lab, pal, alpha=0.5)
    np.testing.assert_allclose(out[0, 0], [0.75, 0.25, 0.25])
    np.testing.assert_allclose(out[0, 1], [0.5, 0.5, 0.5])  # ignored pixel shows the image


def test_to_image_array_layouts_and_range_check():
    chw = torch.rand(3, 4, 5)
    hwc = viz.to_image_array(chw)
    assert hwc.shape == (4, 5, 3)
    np.testing.assert_allclose(hwc[1, 2], chw[:, 1, 2].numpy())
    u8 = np.full((4, 5, 3), 255, np.uint8)
    assert viz.to_image_array(u8).max() == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.to_image_array(torch.randn(3, 4, 5) * 3)


def test_colorize_depth_near_bright_invalid_black():
    d = torch.tensor([[[1.0, 2.0, 0.0]]])
    rgb = viz.colorize_depth(d)
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, 0].sum() > rgb[0, 1].sum()  # near is brighter with magma_r
    np.testing.assert_array_equal(rgb[0, 2], 0.0)
    for scale in ("log", "inverse"):
        r2 = viz.colorize_depth(torch.tensor([[1.0, 10.0, 100.0]]), scale=scale)
        assert r2[0, 0].sum() > r2[0, 1].sum() > r2[0, 2].sum()
    # log scale puts 10 m exactly half way between 1 m and 100 m
    mid = viz.colorize_depth(torch.tensor([[1.0, 10.0, 100.0]]), scale="log", cmap="gray")
    assert mid[0, 1, 0] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="scale"):
        viz.colorize_depth(d, scale="cubic")


def test_grid_to_cells_matches_grid_sample():
    """The (row, col) viz reports is exactly where grid_sample(align_corners=True) reads."""
    h, w = 5, 7
    # a feature map whose value is 100*row + col, so the read value encodes the location
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w)
    feat = torch.stack([rows, cols])[None]  # (1, 2, h, w)
    grid = torch.rand(1, 3, 4, 2, dtype=torch.float64) * 2 - 1
    read = F.grid_sample(feat, grid, mode="bilinear", align_corners=True)[0]  # (2, 3, 4)
    cells = viz.grid_to_cells(grid[0], h, w)
    np.testing.assert_allclose(cells[..., 0], read[0].numpy(), atol=1e-9)
    np.testing.assert_allclose(cells[..., 1], read[1].numpy(), atol=1e-9)


def test_indices_and_pixels_by_hand():
    cells = viz.indices_to_cells(torch.tensor([0, 9, 13]), w=4)
    np.testing.assert_array_equal(cells, [[0, 0], [2, 1], [3, 1]])
    np.testing.assert_array_equal(viz.cells_to_indices(cells, 4, 4), [0, 9, 13])
    np.testing.assert_array_equal(viz.cells_to_indices([[0.4, 2.6], [-1.0, 9.0]], 4, 4), [3, 3])
    # 2x2 grid on a 8x8 image: cell (0,0) centre at pixel 1.5, cell (1,1) at 5.5
    px = viz.cells_to_pixels(np.array([[0, 0], [1, 1]]), (2, 2), (8, 8))
    np.testing.assert_allclose(px, [[1.5, 1.5], [5.5, 5.5]])


def test_sample_coverage_by_hand():
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [10, 0, 0]])
    cov = viz.sample_coverage(pts, [0, 3], labels=[0, 0, 1, 2])
    # nearest sample distances: 0, 1, 3, 0
    assert cov["mean_dist"] == pytest.approx(1.0)
    assert cov["max_dist"] == pytest.approx(3.0)
    assert cov["classes_hit"] == pytest.approx(2 / 3)


def test_open3d_fps_matches_bruteforce_greedy():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(200, 3, generator=g, dtype=torch.float64)
    # independent brute-force greedy FPS from index 0
    chosen = [0]
    dist = ((pts - pts[0]) ** 2).sum(1)
    for _ in range(24):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, ((pts - pts[nxt]) ** 2).sum(1))
    got = viz.open3d_farthest_point_indices(pts, 25)
    np.testing.assert_array_equal(got, np.sort(chosen))


def test_point_cloud_figure_and_html(tmp_path):
    pts = torch.rand(50, 3)
    cols = torch.rand(50, 3)
    fig = viz.point_cloud_figure(pts, cols, highlight={"fps": [0, 5, 7], "random": torch.tensor([1, 2])},
                                 title="t")
    assert len(fig.data) == 3
    assert list(fig.data[1].x) == pytest.approx(pts[[0, 5, 7], 0].tolist())
    with pytest.raises(ValueError, match="outside"):
        viz.point_cloud_figure(pts, highlight={"x": [50]})
    out = viz.save_html(fig, tmp_path / "a.html", include_plotlyjs="directory")
    assert out.is_file() and (tmp_path / "plotly.min.js").is_file()
    assert out.stat().st_size < 200_000  # the library is shared, not embedded
    with pytest.raises(ValueError, match="network"):
        viz.save_html(fig, tmp_path / "b.html", include_plotlyjs="cdn")


def test_point_cloud_subsampling_keeps_highlights():
    pts = torch.rand(1000, 3)
    fig = viz.point_cloud_figure(pts, highlight={"s": [999]}, max_points=100)
    assert len(fig.data[0].x) == 100
    assert fig.data[1].x[0] == pytest.approx(float(pts[999, 0]))


def test_static_plots_and_save(tmp_path):
    img = torch.rand(3, 16, 16)
    fig, axes = plt.subplots(1, 4)
    cells = viz.grid_to_cells(torch.zeros(2, 2, 2), 4, 4)
    viz.plot_samples_on_image(axes[0], img, cells, (4, 4), title="samples")
    viz.plot_samples_on_feature_grid(axes[1], [cells, viz.indices_to_cells([0, 15], 4)], (4, 4),
                                     labels=["a", "b"], background=torch.rand(4, 4))
    corr = torch.rand(3, 3, 3, 3) * 2 - 1
    viz.plot_correlation_query(axes[2], corr, (1, 1), title="F")
    viz.plot_correlation_matrix(axes[3], corr[None], order=np.arange(9)[::-1])
    # row/column orders permute exactly as indexing would
    fig_m, ax_m = plt.subplots()
    mat = torch.arange(16.0).view(2, 2, 2, 2)
    viz.plot_correlation_matrix(ax_m, mat, order=[1, 0, 3, 2], col_order=[3, 2, 1, 0], vmin=None, vmax=None)
    np.testing.assert_array_equal(ax_m.images[0].get_array(), mat.view(4, 4).numpy()[[1, 0, 3, 2]][:, [3, 2, 1, 0]])
    viz.add_caption(fig, "made by a test " * 30)
    path = viz.save_figure(fig, tmp_path / "f" / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig2, ax = plt.subplots()
    viz.plot_heatmap_on_image(ax, img, torch.rand(4, 4), mark=(2, 2), title="heat")
    viz.plot_iou_bars([0.5, float("nan"), 0.25], ["a", "b", "c"], palette=viz.make_palette(3))
    viz.plot_iou_bars(None, ["a", "b"], compare={"STEGO": [10.0, 20.0], "DepthG": [30.0, 40.0]})
    viz.plot_confusion(np.array([[3, 1], [0, 0]]), ["a", "b"])
    viz.plot_predictions([img, img], {"gt": [np.zeros((16, 16), int)] * 2, "pred": [np.ones((16, 16), int)] * 2},
                         viz.make_palette(2))
    with pytest.raises(ValueError, match="column"):
        viz.plot_predictions([img], {"gt": []}, viz.make_palette(2))


def test_training_log_reading_and_curves(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": i, "loss": {"total": 1.0 / (i + 1), "depth": 0.1}, "lr": 5e-4}) for i in range(5)]
    lines.append(json.dumps({"step": 4, "val": {"miou": 12.5}}))
    log.write_text("\n".join(lines) + "\n{\"step\": 5, \"lo")  # truncated last line from a killed run
    recs = viz.read_jsonl(log)
    assert len(recs) == 6
    fig = viz.plot_training_curves(log, groups={"losses": ["loss/total", "loss/depth"], "val": ["val/miou"]},
                                   smooth=2)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 2
    two = viz.plot_training_curves({"STEGO": log, "DepthG": recs}, groups={"losses": ["loss/total"]})
    assert [line.get_label() for line in two.axes[0].lines] == ["STEGO: total", "DepthG: total"]  # the panel's shared "loss/" prefix is dropped
    assert two.axes[0].lines[0].get_linestyle() != two.axes[0].lines[1].get_linestyle()
    with pytest.raises(ValueError, match="none of the requested"):
        viz.plot_training_curves(recs, keys=["nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"a\": 1}\nnot json\n{\"a\": 2}\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        viz.read_jsonl(bad)
    with pytest.raises(FileNotFoundError):
        viz.read_jsonl(tmp_path / "missing.jsonl")


def test_markdown_table_by_hand():
    rows = [{"a": 1.234, "b": None, "c": {"mean": 2.0, "std": 0.5}}, {"a": "x|y", "c": {"mean": 3.0, "std": float("nan")}}]
    text = viz.markdown_table(rows, ["a", "b", "c"], digits=2)
    assert text.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1.23 | – | 2.00 ± 0.50 |",
        "| x\\|y | – | 3.00 |",
    ]
    assert viz.markdown_table([{"a": 81.604, "b": 21.0}], ["a", "b"], digits=None).splitlines()[-1] == "| 81.604 | 21.0 |"


def test_dataset_palettes_come_from_the_data_package():
    data = pytest.importorskip("depthg.data")
    for name in ("potsdam", "cocostuff", "cityscapes"):
        np.testing.assert_array_equal(viz.get_palette(name), data.PALETTES[name])


def test_static_point_cloud(tmp_path):
    fig = plt.figure()
    ax = fig.add_subplot(projection="3d")
    pts = torch.rand(30, 3)
    viz.plot_point_cloud(ax, pts, torch.rand(30, 3), highlight={"FPS": [0, 1, 2]}, title="t")
    assert len(ax.collections) == 2
    np.testing.assert_allclose(np.asarray(ax.collections[1]._offsets3d[0]), pts[:3, 0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        viz.plot_point_cloud(ax, pts, highlight={"x": [30]})
    viz.save_figure(fig, tmp_path / "pc.png")


def test_show_depth_shares_a_scale_and_labels_it():
    depth = np.array([[2.0, 4.0], [0.0, np.nan]])
    fig, axes = plt.subplots(1, 2)
    im = viz.show_depth(axes[0], depth, "reference", vmin=1.0, vmax=5.0)
    assert (im.norm.vmin, im.norm.vmax) == (1.0, 5.0)
    shown = im.get_array()
    assert shown.mask.tolist() == [[False, False], [True, True]]  # invalid pixels are left out of the scale
    # the colour of a pixel is the colour bar's colour at its depth: 4 m is 3/4 up a 1..5 m bar
    np.testing.assert_allclose(im.to_rgba(shown)[0, 1], im.cmap(0.75), atol=1e-6)
    bar = im.colorbar
    assert bar.ax.get_ylabel() == "depth (m)"
    assert {t.get_text() for t in bar.ax.texts} == {"near", "far"}
    log = viz.show_depth(axes[1], depth, scale="log", units="km")
    assert type(log.norm).__name__ == "LogNorm" and log.colorbar.ax.get_ylabel() == "depth (km)"
    with pytest.raises(viz.VizError, match="no valid"):
        viz.show_depth(axes[1], np.zeros((2, 2)))
    plt.close(fig)


def test_point_cloud_figure_frames_the_data():
    pts = np.stack([np.linspace(-10, 10, 50), np.linspace(-2, 2, 50), np.linspace(3, 200, 50)], axis=1)
    fig = viz.point_cloud_figure(pts, units="m")
    scene = fig.layout.scene
    ratio = scene.aspectratio
    # extents 20 x 4 x 197 m, longest side 1; a flat side is kept at >= 0.05 so the box never collapses
    np.testing.assert_allclose([ratio.x, ratio.y, ratio.z], [20 / 197, 0.05, 1.0], rtol=1e-6)
    # the eye is outside the box (which spans +-ratio/2 around the centre), behind the nearest points
    assert scene.camera.eye.z < -0.5 * ratio.z and scene.xaxis.title.text == "X (m)"


def test_slider_is_wide_and_updates_on_release():
    widgets = pytest.importorskip("ipywidgets")
    s = viz.slider("samples per side S", 11, 2, 20)
    assert isinstance(s, widgets.IntSlider) and (s.value, s.min, s.max, s.step) == (11, 2, 20, 1)
    assert s.continuous_update is False  # redraw once, on release
    assert s.layout.width == "100%" and s.style.description_width == "initial"
    f = viz.slider("shift b", 0.03, 0.0, 0.5)
    assert isinstance(f, widgets.FloatSlider) and f.step == pytest.approx(0.005) and f.continuous_update is False
    with pytest.raises(ValueError, match="outside"):
        viz.slider("S", 30, 2, 20)


def test_training_curves_one_quantity_per_axis():
    recs = [{"step": i, "train": {"depth_weight": 0.09, "n_side": 8, "total": 1.0 / (i + 1)}} for i in range(4)]
    fig = viz.plot_training_curves(recs)  # no groups: one panel per series, never 0.09 next to 8
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_ylabel() for ax in shown) == ["train/depth_weight", "train/n_side", "train/total"]
    assert all(len(ax.lines) == 1 for ax in shown)
    fig2 = viz.plot_training_curves(recs, groups={"λ_depth": ["train/depth_weight"], "S": ["train/n_side"],
                                                  "loss": ["train/total"], "x": ["train/total"]}, ncols=3)
    assert len(fig2.axes) == 6 and sum(ax.get_visible() for ax in fig2.axes) == 4  # 2 rows, 2 unused hidden


def test_prediction_grid_legend_lists_the_classes_shown():
    pal = viz.make_palette(4)
    gt = np.array([[0, 1], [1, -1]])
    fig = viz.plot_predictions([torch.rand(3, 2, 2)], {"labels": [gt], "pred": [np.array([[3, 3], [0, 0]])]}, pal,
                               class_names=["road", "car", "sky", "tree"], title="labels vs prediction")
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["road", "car", "tree", "ignore / unmatched"]
    np.testing.assert_allclose(legend.legend_handles[2].get_facecolor()[:3], pal[3] / 255.0)
    assert fig._suptitle.get_text() == "labels vs prediction"


def test_heatmap_and_correlation_colour_bars_are_labelled():
    fig, axes = plt.subplots(1, 2)
    viz.plot_heatmap_on_image(axes[0], torch.rand(3, 8, 8), torch.rand(4, 4), colorbar="weight", vmin=0, vmax=1)
    viz.plot_correlation_query(axes[1], torch.rand(2, 2, 2, 2), (0, 0), colorbar="cosine similarity")
    labels = [ax.get_ylabel() for ax in fig.axes[2:]]
    assert labels == ["weight", "cosine similarity"]


def test_training_curves_draw_schedules_as_steps_unsmoothed():
    recs = [{"step": i, "w": 0.09 * 0.8 ** (i // 10), "loss": float(i % 3) + 1e-3 * i} for i in range(40)]
    fig = viz.plot_training_curves(recs, groups={"λ": ["w"], "loss": ["loss"]}, smooth=5)
    w_line, loss_line = fig.axes[0].lines[0], fig.axes[1].lines[0]
    assert w_line.get_drawstyle() == "steps-post"
    np.testing.assert_allclose(w_line.get_ydata(), [r["w"] for r in recs])  # not smoothed
    assert loss_line.get_drawstyle() == "default"
    assert loss_line.get_ydata()[10] == pytest.approx(np.mean([r["loss"] for r in recs[6:11]]))  # smoothed


def test_caption_goes_below_a_figure_legend():
    pal = viz.make_palette(3)
    fig = viz.plot_predictions([torch.rand(3, 4, 4)], {"labels": [np.array([[0, 1], [2, 2]])]}, pal,
                               class_names=["a", "b", "c"])
    text = viz.add_caption(fig, "made by a test")
    renderer = fig.canvas.get_renderer()
    legend_box = fig.legends[0].get_window_extent(renderer)
    assert text.get_window_extent(renderer).y1 <= legend_box.y0 + 1e-6
