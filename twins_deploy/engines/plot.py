"""``bench --plot``: one figure of a bench run to paste into a report.

Left, the latency of every engine at every batch size (p50, with whiskers to p90 and p99); right, its
images per second. The figure reads the bench report (what ``bench --json`` writes), so a saved run
can be drawn again: ``plot_bench(json.load(open("bench.json")), "bench.svg")``. matplotlib is an
optional extra (``pip install 'twins-deploy[plot]'``), imported only here.
"""
from __future__ import annotations

from pathlib import Path

from twins_deploy.errors import UsageError

PLOT_FORMATS = (".png", ".svg")
INSTALL = "pip install 'twins-deploy[plot]' (or matplotlib>=3.7)"


def check_plot_path(path: str | Path) -> None:
    """Fail before the bench runs, not after: a .png or .svg path, and matplotlib installed."""
    if Path(path).suffix.lower() not in PLOT_FORMATS:
        raise UsageError(f"--plot writes a .png or .svg file, got {str(path)!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot draws with matplotlib, which is not installed: {INSTALL}") from None


def plot_series(report: dict) -> tuple[list[int], list[tuple[str, list[dict]]]]:
    """The batch sizes (ascending), and per engine in the run's order its label and result rows at them.

    Rows come batch by batch with the engines in the same order in each, so an engine is its position;
    engines of one name (two files of one precision) are told apart by what ``--engine`` said, then by number."""
    rows = report["results"]
    run_batches = list(dict.fromkeys(row["batch"] for row in rows))
    per_batch = len(rows) // len(run_batches)
    labels = [row["engine"] for row in rows[:per_batch]]
    asked = report.get("settings", {}).get("engines") or []
    if len(set(labels)) < len(labels) and len(asked) == len(labels):
        labels = [f"{label} ({spec})" if spec != label else label for label, spec in zip(labels, asked)]
    labels = [label if labels.count(label) == 1 else f"{label} #{labels[:i + 1].count(label)}"
              for i, label in enumerate(labels)]
    batches = sorted(run_batches)
    series = [(label, sorted(rows[i::per_batch], key=lambda row: row["batch"])) for i, label in enumerate(labels)]
    return batches, series


def plot_bench(report: dict, path: str | Path) -> Path:
    """Draw ``report`` (a bench report) into ``path`` (.png or .svg), written atomically."""
    check_plot_path(path)
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import LogFormatter

    from twins_deploy.files import atomic_output

    path = Path(path)
    batches, series = plot_series(report)
    machine, settings = report.get("machine", {}), report.get("settings", {})
    gpu = (machine.get("gpu") or {}).get("name", "no GPU")
    model = f", {settings['model']}" if settings.get("model") else ""
    title = (f"twins-deploy bench{model}: {machine.get('cpu', 'CPU')} ({machine.get('cpu_threads', '?')} threads), "
             f"{gpu}; {settings.get('clock', 'wall')} clock")
    libraries = ", ".join(f"{name} {version}" for name, version in machine.get("libraries", {}).items())
    description = f"engines: {', '.join(label for label, _ in series)}; batches: {', '.join(map(str, batches))}"
    every_row = [row for _, rows in series for row in rows]

    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):  # SVG text stays text: selectable
        figure = Figure(figsize=(11, 4.6), layout="constrained")
        latency, throughput = figure.subplots(1, 2)
        width = 0.8 / len(series)
        colors = matplotlib.colormaps["tab10"].colors
        for index, (label, rows) in enumerate(series):
            x = [b + (index - (len(series) - 1) / 2) * width for b in range(len(batches))]
            p50 = [row["latency_ms_p50"] for row in rows]
            p90 = [row["latency_ms_p90"] for row in rows]
            p99 = [row["latency_ms_p99"] for row in rows]
            color = colors[index % len(colors)]
            latency.vlines(x, p50, p99, color=color, linewidth=1)  # p50 to p99: thin
            latency.vlines(x, p50, p90, color=color, linewidth=4)  # p50 to p90: thick
            latency.scatter(x, p99, marker="_", s=80, color=color)
            latency.scatter(x, p50, marker="o", s=30, color=color, edgecolors="white", zorder=3, label=label)
            bars = throughput.bar(x, [row["throughput_img_per_s"] for row in rows], width * 0.9, color=color,
                                  label=label)
            throughput.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        for axes in (latency, throughput):
            axes.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
            axes.grid(axis="y", alpha=0.3)
        highest = max(row["latency_ms_p99"] for row in every_row)
        lowest = min(row["latency_ms_p50"] for row in every_row)
        if lowest > 0 and highest / lowest > 20:  # batch 1 and batch 32 on one readable scale
            latency.set_yscale("log")
            latency.yaxis.set_major_formatter(LogFormatter())  # 20, 300: not 2x10^1
            latency.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        latency.set_ylabel("latency per batch, ms")
        latency.set_title("latency: p50, thick to p90, thin to p99")
        throughput.set_ylabel("images per second")
        throughput.set_title("throughput")
        figure.suptitle(title)
        figure.legend(*throughput.get_legend_handles_labels(), loc="outside lower center", ncols=min(len(series), 4),
                      title=libraries, title_fontsize=7, fontsize=8, frameon=False)
        with atomic_output(path) as tmp:
            figure.savefig(tmp, format=path.suffix.lower()[1:], dpi=150,
                           metadata={"Title": title, "Description": description})
    return path
