"""Report of ``bench/gpu_check.sh``: one markdown file from its run folder.

    .venv/bin/python bench/gpu_check.py report RUN_DIR OUT.md

``RUN_DIR`` holds, per stage ``<n>-<name>``: ``.rc`` (exit status; 124 = stage timeout),
``.seconds``, ``.log`` (pytest output), optionally ``.xml`` (junit) and ``.json``
(pytest-benchmark). The report lists the device, versions and commit, each stage's status and test
counts (with the failing tests), and one table per benchmark group: median, min, the ratios this
run measured (``dense / impl`` where the group has a ``dense`` row, ``impl / floor`` where it has a
``floor`` row) and the figures of ``extra_info`` (throughput, peak memory). Needs only the
standard library and torch / triton for the versions.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# extra_info keys worth a column, in this order, with their headers
FIGURES = {
    "tflop_per_s": "TFLOP/s",
    "gflop_per_s": "GFLOP/s",
    "gb_per_s": "GB/s",
    "decoder_row_gb_per_s": "row GB/s",
    "peak_mem_gib": "peak GiB",
    "peak_mem_mb": "peak MiB",
}


def environment() -> dict[str, str]:
    """Device, versions and commit of this checkout (what the report's header shows)."""
    env = {"python": platform.python_version(), "host": platform.node()}
    # guarded: the report still runs (saying "missing") where torch or triton is not installed
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda or "n/a"
        env["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available()
                         else f"cpu ({platform.processor() or platform.machine()})")
    except ImportError:
        env["torch"], env["device"] = "missing", "unknown"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "missing"
    # the device machine's copy of the checkout may have no .git: the caller can pass the commit
    env["commit"] = _git("rev-parse", "HEAD") or os.environ.get("GPU_CHECK_COMMIT", "unknown")
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["dirty"] = "unknown" if status is None else ("yes" if status else "no")
    return env


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_slug(device: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (for the file name)."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"


def junit_summary(path: Path) -> tuple[dict[str, int], list[str]]:
    """Counts (tests, failures, errors, skipped) and the ids of failed / errored tests."""
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed: list[str] = []
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, failed


def _last_line(log: Path) -> str:
    """pytest's closing line (``12 passed in 3.2s``), or the log's last line."""
    if not log.exists():
        return ""
    lines = [ln.strip("= ") for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|skipped|deselected|no tests ran)\b", ln):
            return ln
    return lines[-1] if lines else ""


def stage_rows(run: Path) -> list[str]:
    rows = ["| stage | status | seconds | tests | summary |", "| --- | --- | --- | --- | --- |"]
    details: list[str] = []
    for rc_file in sorted(run.glob("*.rc")):
        stage = rc_file.stem
        rc = int(rc_file.read_text().strip() or 1)
        status = {0: "ok", 124: "TIMEOUT", 5: "no tests"}.get(rc, f"FAILED (rc {rc})")
        seconds = (run / f"{stage}.seconds").read_text().strip() \
            if (run / f"{stage}.seconds").exists() else "?"
        tests = ""
        xml = run / f"{stage}.xml"
        if xml.exists():
            try:
                counts, failed = junit_summary(xml)
            except ET.ParseError:
                counts, failed = None, []
            if counts is not None:
                tests = (f"{counts['passed']} passed, {counts['failures']} failed, "
                         f"{counts['errors']} errors, {counts['skipped']} skipped")
            if failed:
                details.append(f"**{stage}** failed: " + ", ".join(f"`{f}`" for f in failed[:30]))
        summary = ("killed at the stage's time limit" if rc == 124
                   else _last_line(run / f"{stage}.log").replace("|", "\\|"))
        rows.append(f"| {stage} | {status} | {seconds} | {tests} | {summary} |")
    return rows + ([""] + details if details else [])


def _impl(bench: dict) -> str:
    info = bench.get("extra_info", {})
    if "impl" in info:
        return str(info["impl"])
    param = bench.get("param") or ""
    return param.split("-")[-1] if param else bench["name"]


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def bench_tables(benchmarks: list[dict]) -> list[str]:
    """One table per group; ratios from medians (and mins) of this run only."""
    groups: dict[str, list[dict]] = {}
    for b in benchmarks:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    out: list[str] = []
    for group, items in groups.items():
        by_impl = {_impl(b): b["stats"] for b in items}
        dense, floor = by_impl.get("dense"), by_impl.get("floor")
        figures = [k for k in FIGURES if any(k in b.get("extra_info", {}) for b in items)]
        head = ["benchmark", "median ms", "min ms"]
        head += ["dense / this (min)"] if dense else []
        head += ["this / floor (min)"] if floor else []
        head += [FIGURES[k] for k in figures]
        out += [f"#### {group}", "", "| " + " | ".join(head) + " |",
                "|" + " --- |" * len(head)]
        for b in items:
            s, info = b["stats"], b.get("extra_info", {})
            row = [b["name"], f"{s['median'] * 1e3:.2f}", f"{s['min'] * 1e3:.2f}"]
            if dense:
                row.append("-" if s is dense else f"{dense['median'] / s['median']:.2f}x "
                           f"({dense['min'] / s['min']:.2f}x)")
            if floor:
                row.append("-" if s is floor else f"{s['median'] / floor['median']:.2f}x "
                           f"({s['min'] / floor['min']:.2f}x)")
            row += [_fmt(info.get(k)) for k in figures]
            out.append("| " + " | ".join(row) + " |")
        shapes = {json.dumps(b.get("extra_info", {}).get("shape"), sort_keys=True) for b in items}
        shapes.discard("null")
        if shapes:
            out += ["", "shape: " + "; ".join(f"`{s}`" for s in sorted(shapes))]
        out.append("")
    return out


def report(run: Path, md: Path) -> str:
    env = environment()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU check: {env['device']}", "",
             f"- date: {now}",
             f"- device: {env['device']} (CUDA {env.get('cuda', 'n/a')})",
             f"- torch {env['torch']}, triton {env['triton']}, Python {env['python']}",
             f"- commit: `{env['commit']}` (uncommitted changes to tracked files: {env['dirty']})",
             ]
    mode = run / "mode"
    if mode.exists():
        lines.append(f"- mode: {mode.read_text().strip()}")
    lines += ["", "## Stages", "", *stage_rows(run), "", "## Benchmarks", "",
              "Medians of this run; ratios divide this run's figures (min in brackets).", ""]
    benchmarks: list[dict] = []
    for path in sorted(run.glob("*.json")):
        try:
            benchmarks += json.loads(path.read_text()).get("benchmarks", [])
        except (json.JSONDecodeError, OSError) as exc:
            lines.append(f"- could not read `{path.name}`: {exc}")
    lines += bench_tables(benchmarks) if benchmarks else ["No benchmark results."]
    text = "\n".join(lines).rstrip() + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "slug":  # file name part for a device name
        print(device_slug(argv[1]))
        return 0
    if len(argv) == 3 and argv[0] == "report":
        print(report(Path(argv[1]), Path(argv[2])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
