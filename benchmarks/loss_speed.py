"""Speed and peak memory of FreeKDLoss against the naive per-token formulation, and of dwt2.

Each row is measured as forward + backward time (median of ``--repeats`` runs after 2 warm-ups)
and as the peak *extra* memory the row needs. Every row runs in a fresh child process (this script
re-invoked with the hidden ``--row NAME`` argument), so that the peak of one row never includes
another's. The parent process imports no torch: on Linux a child's ``ru_maxrss`` starts at the
parent's resident size (it is carried over by ``exec``), so the parent is kept small.

Rows:

* ``freekd-official``: ``FreeKDLoss.preset("official", ...)`` (T=6, level granularity, no
  relational term, no low band), prompts marked tuned;
* ``naive-official``: ``tests/naive_freekd.py`` in the same configuration with the same tokens;
* ``freekd-paper`` / ``naive-paper``: the paper configuration (T=2, band granularity, relational);
* ``dwt2`` / ``pytorch_wavelets`` / ``ptwt``: a 3-level Haar transform (mode "zero") of the finest
  map alone, the scalar being the sum of all bands.

Usage (from the repository root; ``-m benchmarks.loss_speed`` works too)::

    .venv/bin/python benchmarks/loss_speed.py [--device cpu|cuda] [--repeats 7] [--quick]
        [--naive-repeats N] [--rows a,b,...] [--out results.md]

On glibc, large fresh allocations are served by ``mmap`` and page-faulted again on every step;
run it a second time with ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296``
to see the figures with memory kept in the heap. The header says which of the two it was.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 0
WARMUPS = 2
OTHER_CORES_FLAG = 0.25  # cores used by other processes above which the times are flagged
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
MALLOC_HINT = (
    "On glibc, large fresh allocations are served by mmap and page-faulted on every step; "
    "also run with `MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296` "
    "to keep them in the heap."
)


@dataclass(frozen=True)
class Shapes:
    """Feature pyramid of one benchmark: ``batch`` x ``channels`` maps of ``sizes``, fine first."""

    label: str
    batch: int
    channels: int
    sizes: tuple[tuple[int, int], ...]

    def describe(self) -> str:
        """One line for the header."""
        maps = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        return f"{self.label}: batch {self.batch}, {self.channels} channels, maps {maps}"


FULL = Shapes(
    "RetinaNet FPN of an 800x1333 image",
    batch=2,
    channels=256,
    sizes=((100, 168), (50, 84), (25, 42), (13, 21), (7, 11)),
)
QUICK = Shapes(
    "quick smoke shapes",
    batch=1,
    channels=64,
    sizes=((50, 84), (25, 42), (13, 21), (7, 11), (4, 6)),
)


@dataclass(frozen=True)
class Row:
    """A table row: ``name`` (the ``--row`` value), a description, its reference row, its group."""

    name: str
    description: str
    reference: str
    group: str


ROWS: tuple[Row, ...] = (
    Row(
        "freekd-official",
        "FreeKDLoss, official preset (T=6, level, no relational)",
        "naive-official",
        "official",
    ),
    Row("naive-official", "naive per-token, official configuration", "naive-official", "official"),
    Row(
        "freekd-paper",
        "FreeKDLoss, paper preset (T=2, band, relational)",
        "naive-paper",
        "paper",
    ),
    Row("naive-paper", "naive per-token, paper configuration", "naive-paper", "paper"),
    Row("dwt2", "freekd.dwt2, 3-level Haar, finest map", "dwt2", "dwt"),
    Row(
        "dwt2-filterbank",
        "the same Haar transform as grouped convolutions, plain autograd (no fast path)",
        "dwt2",
        "dwt",
    ),
    Row(
        "pytorch_wavelets",
        'pytorch_wavelets.DWTForward(J=3, "haar", mode="zero")',
        "dwt2",
        "dwt",
    ),
    Row("ptwt", 'ptwt.wavedec2(x, "haar", level=3, mode="zero")', "dwt2", "dwt"),
)
ROW_BY_NAME = {row.name: row for row in ROWS}


# ------------------------------------------------------------------------------------------------
# Child side: one row, in its own process. torch is imported here only.


def _current_rss_kb() -> int:
    """Resident set size of this process now, in KB (``/proc/self/statm``; Linux)."""
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _max_rss_kb() -> int:
    """Peak resident set size of this process (``ru_maxrss``), in KB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KB on Linux


def _make_pyramid(shapes: Shapes, device: str):
    """Deterministic ``(students, teachers)``: float32 ``[N, C, H, W]`` lists, fine to coarse.

    Drawn on the CPU from a seeded generator (the same in every child), then moved to ``device``.
    The students require grad, the teachers do not.
    """
    import torch

    generator = torch.Generator().manual_seed(SEED)
    students, teachers = [], []
    for height, width in shapes.sizes:
        size = (shapes.batch, shapes.channels, height, width)
        teachers.append(torch.randn(size, generator=generator).to(device))
        student = torch.randn(size, generator=generator).to(device)
        students.append(student.requires_grad_(True))
    return students, teachers


def _make_loss(preset: str, shapes: Shapes, device: str):
    """``FreeKDLoss.preset(preset, ...)`` with seeded prompt tokens, marked tuned."""
    import torch

    from freekd import FreeKDLoss

    torch.manual_seed(SEED)
    loss = FreeKDLoss.preset(preset, [shapes.channels] * len(shapes.sizes)).to(device)
    for prompt in loss.prompts:
        prompt.mark_tuned()
    return loss


def _naive_loss_fn(preset: str, shapes: Shapes, device: str, students, teachers):
    """The naive formulation of ``preset`` with the same tokens as ``_make_loss(preset, ...)``.

    Returns ``(fn, note)``. On a GPU the official configuration (no relational term) calls
    ``naive_layer_loss`` per layer with an all-ones weight on the device, because
    ``naive_freekd_loss`` then builds its weight on the CPU (same arithmetic; see the note).
    """
    import torch

    from tests.naive_freekd import naive_freekd_loss, naive_layer_loss

    loss = _make_loss(preset, shapes, device)
    tokens = [prompt.tokens.detach() for prompt in loss.prompts]
    granularity, relational = loss.granularity, loss.relational
    include_low, levels, wavelet = loss.include_low, loss.levels, loss.wavelet

    if relational or device == "cpu":

        def fn():
            return naive_freekd_loss(
                students, teachers, tokens, granularity, include_low, relational, levels, wavelet
            )

        return fn, None

    def fn_device_weight():
        total = teachers[0].new_zeros(())
        for s, t, tok in zip(students, teachers, tokens, strict=True):
            ones = torch.ones(t.shape[:2], dtype=t.dtype, device=t.device)
            total = total + naive_layer_loss(
                s, t.detach(), tok, granularity, include_low, ones, levels, wavelet
            )
        return total

    note = (
        "naive_freekd_loss(relational=False) builds its weight on the CPU (fails on CUDA): "
        "naive_layer_loss called per layer with an all-ones weight on the device instead"
    )
    return fn_device_weight, note


def _import_pytorch_wavelets():
    """``(pytorch_wavelets, note)``; ``(None, reason)`` when it cannot be imported.

    pytorch_wavelets 1.3 imports ``pkg_resources`` at import time (for its DTCWT coefficient files
    only), which setuptools >= 81 no longer ships. In that case it is imported with a small
    ``pkg_resources.resource_stream`` stand-in built on ``importlib.resources``, and the row
    says so.
    """
    try:
        import pytorch_wavelets

        return pytorch_wavelets, None
    except ModuleNotFoundError as error:
        if error.name != "pkg_resources":
            return None, f"pytorch_wavelets not importable: {error}"
    import importlib.resources
    import types

    for module in [m for m in sys.modules if m.split(".")[0] == "pytorch_wavelets"]:
        del sys.modules[module]
    shim = types.ModuleType("pkg_resources")

    def resource_stream(package: str, name: str):
        return importlib.resources.files(package).joinpath(name).open("rb")

    shim.resource_stream = resource_stream
    sys.modules["pkg_resources"] = shim
    try:
        import pytorch_wavelets
    except ImportError as error:
        return None, f"pytorch_wavelets not importable: {error}"
    return pytorch_wavelets, (
        "pkg_resources missing (setuptools >= 81): imported with an importlib.resources "
        "stand-in for pkg_resources.resource_stream"
    )


def _transform_fn(name: str, x):
    """``(fn, bands_fn, note)`` for a transform row; ``fn`` is ``None`` when it is unavailable.

    ``fn()`` returns the scalar (sum of all bands); ``bands_fn()`` all bands as a flat list.
    """
    if name == "dwt2":
        from freekd import dwt2

        def bands():
            low, highs = dwt2(x, 3, "haar")
            return [low, *highs]

        return lambda: sum(band.sum() for band in bands()), bands, None
    if name == "dwt2-filterbank":
        from freekd.wavelets import _conv_analysis

        def bands():
            low, out = x, []
            for _ in range(3):
                low, high = _conv_analysis(low, "haar")
                out.append(high)
            return [low, *out]

        return lambda: sum(band.sum() for band in bands()), bands, None
    if name == "pytorch_wavelets":
        module, note = _import_pytorch_wavelets()
        if module is None:
            return None, None, note
        transform = module.DWTForward(J=3, wave="haar", mode="zero").to(x.device)

        def bands():
            low, highs = transform(x)
            return [low, *highs]

        return lambda: sum(band.sum() for band in bands()), bands, note
    try:
        import ptwt
    except ImportError as error:
        return None, None, f"ptwt not importable: {error}"

    def bands():
        low, *details = ptwt.wavedec2(x, "haar", level=3, mode="zero")
        return [low, *(band for level in details for band in level)]

    return lambda: sum(band.sum() for band in bands()), bands, None


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``step()`` once and returns its wall time in ms (synchronised)."""
    import torch

    if device == "cuda":

        def cuda_time(step):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(step):
        begin = time.perf_counter()
        step()
        return (time.perf_counter() - begin) * 1e3

    return cpu_time


def run_row(
    name: str, shapes: Shapes, device: str, repeats: int, threads: int | None = None
) -> dict:
    """Measure one row in this process and return the result as a JSON-able dict."""
    start_max_rss_kb = _max_rss_kb()
    import torch

    import freekd

    if threads is not None:
        torch.set_num_threads(threads)

    info = {
        "row": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "freekd": freekd.__version__,
        "repeats": repeats,
        "notes": [],
    }
    row = ROW_BY_NAME[name]
    students, teachers = _make_pyramid(shapes, device)
    inputs = students
    bands_fn = None
    if row.group == "dwt":
        inputs = [students[0]]
        fn, bands_fn, note = _transform_fn(name, students[0])
        if fn is None:
            return {**info, "skipped": note}
    elif name.startswith("freekd-"):
        loss = _make_loss(row.group, shapes, device)
        fn, note = (lambda: loss(students, teachers)), None
    else:
        fn, note = _naive_loss_fn(row.group, shapes, device, students, teachers)
    if note:
        info["notes"].append(note)

    # Baseline: after imports, inputs and the module (only its small parameters) exist.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    else:
        base_rss_kb = _current_rss_kb()

    values: list[float] = []

    def step():
        for tensor in inputs:
            tensor.grad = None
        value = fn()
        value.backward()
        if not values:
            values.append(value.item())

    timer = _timer(device)
    for _ in range(WARMUPS):
        timer(step)
    times = [timer(step) for _ in range(repeats)]

    if device == "cuda":
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
        memory_kind = "torch.cuda.max_memory_allocated() minus allocation after inputs"
    else:
        end_max_rss_kb = _max_rss_kb()
        peak_mb = (end_max_rss_kb - base_rss_kb) / 1024
        memory_kind = "child max RSS (ru_maxrss) minus its RSS after imports and inputs"
        if start_max_rss_kb >= end_max_rss_kb:
            info["notes"].append(
                f"ru_maxrss ({end_max_rss_kb} KB) was already reached before torch was imported "
                "(inherited from the parent process): the memory figure is not meaningful"
            )
    result = {
        **info,
        "times_ms": times,
        "median_ms": statistics.median(times),
        "value": values[0],
        "peak_mb": peak_mb,
        "memory_kind": memory_kind,
    }
    if bands_fn is not None:  # sanity figure of the transforms, after the measurement
        with torch.no_grad():
            bands = bands_fn()
            result["abs_sum"] = float(sum(band.double().abs().sum().item() for band in bands))
            result["energy"] = float(sum(band.double().square().sum().item() for band in bands))
    return result


# ------------------------------------------------------------------------------------------------
# Parent side: runs the children and writes the table. Standard library only (see the docstring).


def _cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _command_line() -> str:
    """The command that ran this script, with the malloc variables that are set prefixed."""
    env = [f"{var}={os.environ[var]}" for var in MALLOC_VARS if var in os.environ]
    python = sys.executable
    try:
        relative = os.path.relpath(python)
        python = python if relative.startswith("..") else relative
    except ValueError:
        pass
    return " ".join([*env, shlex.join([python, *sys.argv])])


def _run_child(name: str, args: argparse.Namespace, repeats: int) -> dict:
    """Run one row in a fresh process and parse the JSON line it prints (as a module, from the
    repository root, so that the naive rows import ``tests.naive_freekd``)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.loss_speed",
        "--row",
        name,
        "--device",
        args.device,
    ]
    command += ["--repeats", str(repeats)] + (["--quick"] if args.quick else [])
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    try:
        busy_0 = _cpu_busy_seconds()
    except (OSError, ValueError, IndexError):
        busy_0 = None
    usage_0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    begin = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    wall = time.perf_counter() - begin
    usage_1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (usage_1.ru_utime - usage_0.ru_utime) + (usage_1.ru_stime - usage_0.ru_stime)
    # Cores kept busy by other processes while the row ran: all busy time minus the child's.
    other_cores = None if busy_0 is None else (_cpu_busy_seconds() - busy_0 - child_cpu) / wall
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": name, "error": f"exit {done.returncode}: {tail}", "wall_s": wall}
    if done.stderr.strip():  # the child's warnings, passed on
        print(done.stderr.rstrip(), file=sys.stderr)
    result = json.loads(lines[-1])
    result["wall_s"], result["other_cores"] = wall, other_cores
    return result


def _fmt(value: float, digits: int = 1) -> str:
    """A number with ``digits`` decimals and thousands separators."""
    return f"{value:,.{digits}f}"


def _speedup(result: dict, reference: dict | None) -> str:
    """``reference time / row time`` cell."""
    if reference is None or "median_ms" not in reference or "median_ms" not in result:
        return "n/a"
    if result["row"] == reference["row"]:
        return "1.00 (reference)"
    ratio = reference["median_ms"] / result["median_ms"]
    return f"{ratio:.2f} vs {reference['row']}"


def _sanity(result: dict, reference: dict | None, group: str) -> str:
    """Agreement cell: the loss against the naive loss, or the transforms' coefficient sums."""
    if "value" not in result:
        return ""
    if group == "dwt":
        if result["row"] == "dwt2":
            return f"sum abs = {result['abs_sum']:.6g}, energy = {result['energy']:.6g}"
        if reference is None or "abs_sum" not in reference:
            return f"sum abs = {result['abs_sum']:.6g}"
        abs_rel = abs(result["abs_sum"] - reference["abs_sum"]) / reference["abs_sum"]
        energy_rel = abs(result["energy"] - reference["energy"]) / reference["energy"]
        return f"vs dwt2: sum abs rel {abs_rel:.1e}, energy rel {energy_rel:.1e}"
    if reference is None or "value" not in reference:
        return f"loss = {result['value']:.8g}"
    if result["row"] == reference["row"]:
        return f"loss = {result['value']:.8g}"
    diff = abs(result["value"] - reference["value"])
    rel = diff / abs(reference["value"]) if reference["value"] else float("inf")
    return f"{diff:.2e} (rel {rel:.1e})"


def _cpu_busy_seconds() -> float:
    """CPU time all processes have spent busy since boot, in seconds (``/proc/stat``; Linux)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_busy(seconds: float = 1.0) -> str:
    """How many cores other work kept busy over a short sample before the run.

    Times taken while other processes compete for the cores are inflated (the naive rows most).
    """
    try:
        busy_0 = _cpu_busy_seconds()
        time.sleep(seconds)
        busy = (_cpu_busy_seconds() - busy_0) / seconds
    except (OSError, ValueError, IndexError):
        return "n/a"
    flag = " (other work was running: the times are inflated)" if busy >= OTHER_CORES_FLAG else ""
    return f"{busy:.2f} of {os.cpu_count()} cores over {seconds:g} s{flag}"


def render(results: list[dict], args: argparse.Namespace, shapes: Shapes, cpu_busy: str) -> str:
    """The markdown report: header lines, the table, and the notes."""
    by_name = {result["row"]: result for result in results}
    measured = [r for r in results if "median_ms" in r]
    first = measured[0] if measured else {}
    env_state = ", ".join(
        f"{var}={os.environ[var]}" if var in os.environ else f"{var} unset" for var in MALLOC_VARS
    )
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()} cores" + (f" ({affinity} usable)" if affinity else "")
    device = first.get("device_name", args.device)
    memory_kind = first.get("memory_kind", "n/a")
    lines = [
        "# freekd loss speed: forward + backward",
        "",
        f"- machine: {_cpu_model()}, {cores}; torch {first.get('torch', '?')}, "
        f"torch threads: {first.get('threads', '?')}; device: {device}",
        f"- command: `{_command_line()}`",
        f"- glibc malloc env: {env_state}",
        f"- CPU busy just before the first row: {cpu_busy}",
        f"- shapes: {shapes.describe()}; transform rows use the finest map "
        f"{shapes.sizes[0][0]}x{shapes.sizes[0][1]}",
        f"- time: median of the timed runs after {WARMUPS} warm-ups, each a fresh forward and "
        "backward; every row in its own process",
        f"- peak extra memory: {memory_kind}",
        "- speed-up: reference row's median time / this row's median time",
        "- agreement: |loss - naive loss| of the same configuration (float32, first call); "
        "transform rows compare the sum of |coefficients| and the energy with dwt2's "
        "(orientation order and signs differ between libraries)",
        "",
        "| row | what | median time (ms) | min-max (ms) | timed runs | speed-up "
        "| peak extra memory (MB) | agreement |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    notes = []
    for row in ROWS:
        result = by_name.get(row.name)
        if result is None:
            continue
        reference = by_name.get(row.reference)
        if "error" in result or "skipped" in result:
            reason = result.get("error") or result.get("skipped")
            lines.append(f"| {row.name} | {row.description} | - | - | - | - | - | {reason} |")
            continue
        lines.append(
            f"| {row.name} | {row.description} | {_fmt(result['median_ms'])} "
            f"| {_fmt(min(result['times_ms']))}-{_fmt(max(result['times_ms']))} "
            f"| {result['repeats']} | {_speedup(result, reference)} | {_fmt(result['peak_mb'])} "
            f"| {_sanity(result, reference, row.group)} |"
        )
        notes += [f"{row.name}: {note}" for note in result.get("notes", [])]
        other = result.get("other_cores")
        if other is not None and other >= OTHER_CORES_FLAG:
            notes.append(
                f"{row.name}: other processes kept about {other:.1f} cores busy while it ran: "
                "its times are inflated"
            )
    repeats = {r["row"]: r["repeats"] for r in measured}
    if len(set(repeats.values())) > 1:
        notes.append(
            "timed runs differ between rows (--naive-repeats): "
            + ", ".join(f"{name} {count}" for name, count in repeats.items())
        )
    notes.append(MALLOC_HINT)
    lines += ["", *(f"- note: {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--row`` is internal: it runs one row and prints JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per row, after 2 warm-ups (default 7)"
    )
    parser.add_argument(
        "--naive-repeats",
        type=int,
        default=None,
        help="timed runs of the naive rows (default: --repeats)",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--rows",
        default=",".join(row.name for row in ROWS),
        help="comma-separated rows to run (default: all): " + ", ".join(r.name for r in ROWS),
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--row", choices=tuple(ROW_BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = (args.repeats, args.naive_repeats, args.threads)
    if any(count is not None and count < 1 for count in counts):
        parser.error("--repeats, --naive-repeats and --threads must be at least 1")
    unknown = [name for name in args.rows.split(",") if name not in ROW_BY_NAME]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROW_BY_NAME)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the rows (each in a child process) and print the markdown table."""
    args = parse_args(argv)
    shapes = QUICK if args.quick else FULL
    if args.row is not None:  # child: one row, one JSON line
        print(json.dumps(run_row(args.row, shapes, args.device, args.repeats, args.threads)))
        return 0
    results = []
    cpu_busy = _cpu_busy()
    for name in args.rows.split(","):
        naive = name.startswith("naive-") and args.naive_repeats is not None
        repeats = args.naive_repeats if naive else args.repeats
        print(f"[loss_speed] {name} ...", file=sys.stderr, flush=True)
        result = _run_child(name, args, repeats)
        status = result.get("error") or result.get("skipped") or "ok"
        print(f"[loss_speed] {name}: {status} ({result['wall_s']:.1f} s)", file=sys.stderr)
        results.append(result)
    report = render(results, args, shapes, cpu_busy)
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report)
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
