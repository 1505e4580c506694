"""Check the notebooks the way a class sees them: JupyterLab in a real (headless) browser.

Starts JupyterLab on 127.0.0.1 (a free port, a random token, throw-away user settings and workspaces; the
environment's own JupyterLab defaults, which ``./setup.sh`` writes) on a temporary copy of ``notebooks/``,
drives Debian's Chromium with Playwright (``executable_path``, no browser download), opens every notebook,
runs the ones given with ``--run`` (Run All), moves the first slider of each run notebook that makes sliders
and checks that its figure is redrawn, once, on release, then saves the notebook, shuts its kernel down and
opens it again, as a class would open a saved notebook the next day. It fails on:

- a dialog on the page (e.g. JupyterLab's "Build Recommended") or a pop-up notification (e.g. "get notified
  about Jupyter news?");
- an error in the browser console or an uncaught page error;
- an error output, a warning, a traceback or other library noise in a cell's output (``[Open3D ...]`` lines;
  the workbench's own notes on stderr are fine);
- a widget that does not render (also after the notebook was saved and opened again: "Error displaying
  widget: model not found" when its state was not saved); a slider narrower than ``--min-slider-px``, one
  that redraws while it is dragged, or one whose figure does not change after it is released; a notebook
  that makes sliders (``viz.slider``) but shows none live;
- a figure shown smaller than it was drawn (JupyterLab shrinks an image wider than the output area, and its
  text with it).

Notebooks may be saved with outputs (they are opened as they are; the parameters a papermill run injected
are replaced by the check's own).

    .venv/bin/python scripts/check_jupyterlab.py                      # open all, Run All on 02 (full)
    .venv/bin/python scripts/check_jupyterlab.py --smoke --run 02_fps_point_clouds.ipynb
    .venv/bin/python scripts/check_jupyterlab.py --run all --screenshots ~/depthg_shots

Nothing in the repository is written: JupyterLab serves a copy of the notebooks, the run notebooks get their
output folders (``output_dir``, ``runs_dir``) pointed into a temporary folder, injected after their
parameters cell as papermill does, and a last check compares figures/, runs/ and notebooks/ before and
after (the data caches are shared; they are built under locks). With ``--smoke`` the run notebooks also get
``smoke = True``, so they run in seconds. Exit code 0 when everything passed, 1 on a failed check, 2 on bad
arguments or a missing browser.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"  # --dir changes it

# stdout/stderr text that is library noise, not the notebook's own output
NOISE = re.compile(r"\[Open3D [A-Z]+\]|WebRTC|Jupyter environment detected|Warning\b|warnings\.warn|Traceback")
# stderr that is a progress bar (tqdm's text mode) rather than a message
PROGRESS = re.compile(r"^\s*[^\n]*\d+%\|[^\n]*\|")

# JavaScript run in the page (the app is exposed as window.jupyterapp)
JS_CURRENT_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.sessionContext || !w.sessionContext.session || !w.sessionContext.session.kernel) return false;
  return w.sessionContext.session.kernel.status === 'idle' && w.content && w.content.widgets.length > 0;
}"""
JS_BUSY = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const running = [...w.node.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'));
  return running || !k || k.status !== 'idle';
}"""
JS_OUTPUTS = """() => {
  const model = window.jupyterapp.shell.currentWidget.content.model;
  const cells = [];
  for (let i = 0; i < model.cells.length; i++) {
    const c = model.cells.get(i);
    if (c.type !== 'code') continue;
    const outs = c.outputs.toJSON().map(o => ({
      output_type: o.output_type, name: o.name || null,
      text: Array.isArray(o.text) ? o.text.join('') : (o.text || ''),
      ename: o.ename || null, evalue: o.evalue || null,
      mimes: o.data ? Object.keys(o.data) : [],
      plain: o.data && o.data['text/plain'] ? [].concat(o.data['text/plain']).join('') : ''}));
    cells.push({index: i, execution_count: c.executionCount, outputs: outs});
  }
  return cells;
}"""
JS_WIDGET_PROBLEMS = """() => [...window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output')]
  .map(e => e.innerText || '').filter(t => /Error displaying widget|Loading widget\\.\\.\\./.test(t))
  .map(t => t.slice(0, 200))"""
# output images shown narrower than they are (JupyterLab scales an image down to the output area's width)
JS_SHRUNK_IMAGES = """() => [...window.jupyterapp.shell.currentWidget.node.querySelectorAll('.jp-OutputArea-output img')]
  .filter(i => i.naturalWidth > 0 && i.getBoundingClientRect().width < 0.98 * i.naturalWidth)
  .map(i => `${i.naturalWidth} px image shown ${Math.round(i.getBoundingClientRect().width)} px wide`)"""
JS_SAVE = "() => window.jupyterapp.commands.execute('docmanager:save').then(() => true)"
JS_CLOSE = """() => { const w = window.jupyterapp.shell.currentWidget;
  return w.sessionContext.shutdown().then(() => { w.dispose(); return true; }); }"""
JS_DIALOGS = """() => [...document.querySelectorAll('.jp-Dialog')].map(d => d.innerText.replace(/\\s+/g, ' ').trim())"""
JS_TOASTS = """() => [...document.querySelectorAll('.Toastify__toast')].map(d => d.innerText.replace(/\\s+/g, ' ').trim())"""
# a fingerprint of what the slider's cell shows (images, svg, plotly, text of output widgets)
JS_FIGURE = """(slider) => {
  const cell = slider.closest('.jp-Cell');
  const parts = [];
  cell.querySelectorAll('.jp-OutputArea-output img').forEach(i => parts.push('img:' + i.src.length + ':' + i.src.slice(-200)));
  cell.querySelectorAll('.jp-OutputArea-output svg').forEach(s => parts.push('svg:' + s.outerHTML.length));
  cell.querySelectorAll('.widget-output').forEach(o => parts.push('out:' + (o.innerText || '').slice(0, 2000)));
  return parts.join('|');
}"""


class CheckFailed(Exception):
    pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium(explicit: str | None) -> str | None:
    """The Chromium executable: ``--chromium``, ``$CHROMIUM``, or Debian's ``chromium`` on PATH."""
    for cand in (explicit, os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


# parameters naming folders a notebook writes into: the check points them into its own temporary folder
WRITES = ("output_dir", "runs_dir")


def prepare_notebooks(work: Path, names: list[str], run: list[str], smoke: bool) -> None:
    """Copy the notebooks into ``work``. Into the ones to run, inject (as papermill does, right after the
    cell tagged "parameters") their output folders under ``work/../outputs`` -- a check never writes into the
    repository -- and, with ``smoke``, ``smoke = True``. Caches stay shared (they are built under locks)."""
    import nbformat

    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        if name in run:
            # a notebook saved by papermill carries the parameters of that run: the check's own replace them
            nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
            tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
            if not tagged:
                raise CheckFailed(f"{name} has no cell tagged 'parameters' to inject the check's parameters after")
            declared = re.findall(r"^(\w+)\s*=", nb.cells[tagged[0]].source, re.M)
            values = {k: str(work.parent / "outputs" / Path(name).stem / k) for k in WRITES if k in declared}
            if smoke:
                values["smoke"] = True
            if values:  # an empty cell is never run by JupyterLab (no execution count): inject none
                source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
                nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
        nbformat.write(nb, work / name)


def makes_sliders(name: str) -> bool:
    """Whether a notebook draws sliders (``viz.slider``): then a live one must show after Run All."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    return any(c.cell_type == "code" and "slider(" in c.source for c in nb.cells)


def repository_files() -> dict[str, int]:
    """{path: mtime_ns} of the repository's figures/, runs/ and notebooks/, to tell that a check wrote nothing."""
    found = {}
    for folder in ("figures", "runs", "notebooks"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file():
                found[str(path.relative_to(ROOT))] = path.stat().st_mtime_ns
    return found


def start_lab(work: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1:port serving ``work``, with settings and workspaces of its own."""
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(work.parent / "config"),
               JUPYTER_RUNTIME_DIR=str(work.parent / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(work.parent / "ws"))
    env.pop("MPLBACKEND", None)  # the notebooks choose their backend (%matplotlib inline)
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={work.parent / 'settings'}",
           f"--LabApp.workspaces_dir={work.parent / 'ws'}", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=work,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"JupyterLab exited with code {proc.returncode}; its log: {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise CheckFailed(f"JupyterLab did not answer on port {port} within 120 s; its log: {log}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the JupyterLab server (and its kernels) we started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_idle(page, timeout_s: float, settle: int = 3) -> None:
    """Wait until the current notebook's kernel is idle and no cell shows [*], ``settle`` polls in a row."""
    deadline, calm = time.time() + timeout_s, 0
    while time.time() < deadline:
        calm = 0 if page.evaluate(JS_BUSY) else calm + 1
        if calm >= settle:
            return
        time.sleep(1.0)
    raise CheckFailed(f"the kernel was still busy after {timeout_s:.0f} s")


def output_problems(cells: list[dict]) -> list[str]:
    """Error outputs and library noise in the cells' outputs."""
    problems = []
    for cell in cells:
        for out in cell["outputs"]:
            where = f"cell {cell['index']}"
            if out["output_type"] == "error":
                problems.append(f"{where}: error output {out['ename']}: {out['evalue']}")
            elif out["output_type"] == "stream" and out["name"] == "stderr":
                # the workbench's own notes go to stderr ("[ablation] stego seed 0"); warnings, tracebacks,
                # errors and library chatter do not belong there
                lines = [ln for ln in re.split(r"[\r\n]+", out["text"]) if ln.strip() and not PROGRESS.match(ln)]
                bad = [ln for ln in lines if NOISE.search(ln) or re.search(r"\b(Error|error:|Exception)", ln)]
                if bad:
                    problems.append(f"{where}: stderr output: {bad[0][:200]!r}")
            else:
                text = out["text"] or out["plain"]
                if text and NOISE.search(text):
                    line = next(ln for ln in text.splitlines() if NOISE.search(ln))
                    problems.append(f"{where}: library noise in the output: {line[:200]!r}")
    return problems


def move_slider(page, min_width: float, timeout_s: float) -> dict:
    """Drag the first slider of the notebook to the right; its figure must change once, on release."""
    sliders = page.query_selector_all(".jp-Notebook .widget-slider")
    if not sliders:
        raise CheckFailed("no slider (ipywidgets .widget-slider) in the notebook's outputs")
    slider = sliders[0]
    slider.scroll_into_view_if_needed()
    label = (slider.inner_text() or "").strip().replace("\n", " ")
    track = slider.query_selector(".noUi-target") or slider
    handle = slider.query_selector(".noUi-handle")
    if handle is None:
        raise CheckFailed(f"slider {label!r} has no draggable handle")
    tbox, hbox = track.bounding_box(), handle.bounding_box()
    info = {"slider": label, "track_px": round(tbox["width"])}
    if tbox["width"] < min_width:
        raise CheckFailed(f"slider {label!r} is {tbox['width']:.0f} px wide (want >= {min_width:.0f} px)")
    before = page.evaluate(JS_FIGURE, slider)
    x0, y0 = hbox["x"] + hbox["width"] / 2, hbox["y"] + hbox["height"] / 2
    # drag towards whichever side has more room, by a quarter of the track
    right = (tbox["x"] + tbox["width"] - x0) > (x0 - tbox["x"])
    dx = (1 if right else -1) * tbox["width"] / 4
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x0 + dx * k / 10, y0)
        time.sleep(0.05)
    time.sleep(2.0)
    during = page.evaluate(JS_FIGURE, slider)
    page.mouse.up()
    info["value_after"] = (slider.inner_text() or "").strip().replace("\n", " ")
    if during != before:
        raise CheckFailed(f"slider {label!r} redraws its figure while it is dragged (want: on release only)")
    deadline = time.time() + timeout_s
    while time.time() < deadline and page.evaluate(JS_FIGURE, slider) == before:
        time.sleep(0.5)
    wait_idle(page, timeout_s)
    if page.evaluate(JS_FIGURE, slider) == before:
        raise CheckFailed(f"moving slider {label!r} to {info['value_after']!r} did not change its figure")
    info["figure_changed"] = True
    return info


def open_notebook(page, name: str) -> None:
    """Open ``name`` in JupyterLab and wait until its kernel is idle."""
    page.evaluate("(p) => window.jupyterapp.commands.execute('docmanager:open', {path: p}).then(() => true)", name)
    page.wait_for_function(f"() => window.jupyterapp.shell.currentWidget && "
                           f"window.jupyterapp.shell.currentWidget.context && "
                           f"window.jupyterapp.shell.currentWidget.context.path === {json.dumps(name)}", timeout=60_000)
    page.wait_for_function(JS_CURRENT_IDLE, timeout=120_000)
    time.sleep(1.0)


def reopen(page, name: str) -> list[str]:
    """Save the notebook, shut its kernel down, close it and open it again (a new kernel): what a class sees
    when it opens a saved notebook. Returns the widgets that do not render then."""
    page.evaluate(JS_SAVE)
    time.sleep(1.0)
    page.evaluate(JS_CLOSE)
    time.sleep(1.0)
    open_notebook(page, name)
    time.sleep(3.0)  # let saved widgets render
    return [f"after saving and reopening, a widget does not render: {t!r}" for t in page.evaluate(JS_WIDGET_PROBLEMS)]


def check_notebook(page, base: str, name: str, run: bool, args, console: list[dict]) -> dict:
    """Open one notebook (and Run All, move a slider, save and reopen); returns its report (``problems``
    empty = passed)."""
    report: dict = {"notebook": name, "run": run, "problems": []}
    first = len(console)
    open_notebook(page, name)
    report["problems"] += [f"widget does not render on opening: {t!r}" for t in page.evaluate(JS_WIDGET_PROBLEMS)]
    try:
        if run:
            start = time.time()
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells').then(() => true)")
            time.sleep(2.0)
            wait_idle(page, args.timeout)
            report["run_s"] = round(time.time() - start, 1)
            cells = page.evaluate(JS_OUTPUTS)
            report["cells_run"] = sum(c["execution_count"] is not None for c in cells)
            report["code_cells"] = len(cells)
            report["problems"] += output_problems(cells)
            if report["cells_run"] < len(cells):
                report["problems"].append(f"only {report['cells_run']} of {len(cells)} code cells ran")
            time.sleep(3.0)  # let widgets render
            report["problems"] += [f"widget did not render: {t!r}" for t in page.evaluate(JS_WIDGET_PROBLEMS)]
            report["problems"] += [f"figure shrunk to fit: {t}" for t in page.evaluate(JS_SHRUNK_IMAGES)]
            if not args.no_slider and not report["problems"] and makes_sliders(name):
                report["slider"] = move_slider(page, args.min_slider_px, args.timeout)
                report["problems"] += output_problems(page.evaluate(JS_OUTPUTS))
            if not report["problems"]:
                report["problems"] += reopen(page, name)
                report["reopened"] = True
    except CheckFailed as err:
        report["problems"].append(str(err))
    report["problems"] += [f"dialog: {d[:300]}" for d in page.evaluate(JS_DIALOGS)]
    mine = console[first:]
    report["console"] = mine
    report["problems"] += [f"browser console {m['type']}: {m['text'][:300]}" for m in mine if m["type"] in ("error", "pageerror")]
    if args.screenshots:
        page.screenshot(path=str(Path(args.screenshots) / f"{Path(name).stem}.png"), full_page=False)
    return report


def run_check(args) -> list[dict]:
    chromium = find_chromium(args.chromium)
    if chromium is None:
        raise FileNotFoundError("no Chromium found: install Debian's `chromium` (apt-get install chromium, as "
                                "./setup.sh does) or pass --chromium PATH")
    from playwright.sync_api import sync_playwright

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) if args.open == ["all"] else args.open
    run = names if args.run == ["all"] else [] if args.run == ["none"] else args.run
    missing = [n for n in set(names) | set(run) if not (NOTEBOOKS / n).is_file()]
    if missing:
        raise FileNotFoundError(f"no such notebook in {NOTEBOOKS}: {', '.join(sorted(missing))}")
    names = names + [n for n in run if n not in names]
    if args.screenshots:
        Path(args.screenshots).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="depthg_lab_") as tmp:
        work = Path(tmp) / "notebooks"
        work.mkdir()
        prepare_notebooks(work, names, run, args.smoke)
        port, token, log = free_port(), secrets.token_hex(16), Path(tmp) / "jupyterlab.log"
        before = repository_files()
        proc = start_lab(work, port, token, log)
        reports: list[dict] = []
        console: list[dict] = []
        try:
            with sync_playwright() as pw:
                launch_args = ["--disable-gpu", "--disable-dev-shm-usage"]
                if hasattr(os, "geteuid") and os.geteuid() == 0:
                    launch_args.append("--no-sandbox")  # Chromium refuses to sandbox as root
                browser = pw.chromium.launch(executable_path=chromium, args=launch_args, headless=True)
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.on("console", lambda m: console.append({"type": m.type, "text": m.text}))
                page.on("pageerror", lambda e: console.append({"type": "pageerror", "text": str(e)}))
                base = f"http://127.0.0.1:{port}"
                page.goto(f"{base}/lab?reset&token={token}")
                page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started !== undefined",
                                       timeout=120_000)
                page.evaluate("() => window.jupyterapp.started.then(() => true)")
                page.wait_for_selector(".jp-LabShell", timeout=120_000)
                time.sleep(5.0)  # the build check and extension start-up run right after load
                startup = {"notebook": "(JupyterLab start-up)", "run": False, "console": list(console),
                           "problems": [f"dialog: {d[:300]}" for d in page.evaluate(JS_DIALOGS)]
                           + [f"notification: {t[:300]}" for t in page.evaluate(JS_TOASTS)]}
                startup["problems"] += [f"browser console {m['type']}: {m['text'][:300]}" for m in console
                                        if m["type"] in ("error", "pageerror")]
                reports.append(startup)
                for d in page.query_selector_all(".jp-Dialog button.jp-mod-reject"):
                    d.click()  # dismiss, so the notebooks can still be checked
                for name in names:
                    print(f"checking {name}{' (Run All)' if name in run else ''} ...", flush=True)
                    reports.append(check_notebook(page, base, name, name in run, args, console))
                browser.close()
        finally:
            stop(proc)
            if args.server_log:
                shutil.copy(log, args.server_log)
        after = repository_files()
        touched = sorted(p for p in after if before.get(p) != after[p])
        reports.append({"notebook": "(repository untouched)", "run": False, "console": [],
                        "problems": [f"the check wrote into the repository: {p}" for p in touched[:20]]})
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open", nargs="+", default=["all"], metavar="NOTEBOOK",
                        help="notebooks to open (file names in notebooks/, or 'all'; default: all)")
    parser.add_argument("--run", nargs="+", default=["02_fps_point_clouds.ipynb"], metavar="NOTEBOOK",
                        help="notebooks to Run All and move a slider in ('all' for every one, 'none'; default: 02)")
    parser.add_argument("--smoke", action="store_true", help="run the notebooks with smoke = True (seconds, not minutes)")
    parser.add_argument("--no-slider", action="store_true", help="do not move a slider after Run All")
    parser.add_argument("--min-slider-px", type=float, default=300.0, help="narrowest acceptable slider track (px)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed for one Run All or redraw")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM or `chromium` on PATH)")
    parser.add_argument("--screenshots", default=None, help="folder for one screenshot per notebook")
    parser.add_argument("--server-log", default=None, help="copy JupyterLab's log here")
    parser.add_argument("--json", default=None, help="write the full report (all console messages) here")
    parser.add_argument("--dir", default=None, help="folder of the notebooks (default: the repository's notebooks/)")
    args = parser.parse_args(argv)
    if args.dir:
        global NOTEBOOKS
        NOTEBOOKS = Path(args.dir).resolve()
    try:
        reports = run_check(args)
    except FileNotFoundError as err:
        print(f"check_jupyterlab: error: {err}", file=sys.stderr)
        return 2
    except CheckFailed as err:
        print(f"check_jupyterlab: FAILED: {err}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))
    failed = 0
    for rep in reports:
        extra = ""
        if rep.get("run"):
            extra = f" ran {rep.get('cells_run', 0)}/{rep.get('code_cells', 0)} cells in {rep.get('run_s', '?')} s"
            if "slider" in rep:
                s = rep["slider"]
                extra += f"; slider {s['slider']!r} ({s['track_px']} px) -> {s['value_after']!r}: figure redrawn on release"
        status = "ok  " if not rep["problems"] else "FAIL"
        failed += bool(rep["problems"])
        print(f"{status} {rep['notebook']}{extra}; console: "
              f"{sum(m['type'] in ('error', 'pageerror') for m in rep['console'])} errors, "
              f"{sum(m['type'] == 'warning' for m in rep['console'])} warnings")
        for p in rep["problems"]:
            print(f"     - {p}")
    print(f"{len(reports) - failed} of {len(reports)} checks without problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
