"""Every code block of README.md and docs/*.md is real and runs as written, offline.

- A ``python`` block is the body of one script of ``examples/`` (the script is its module
  docstring, then the block, character for character), and every script runs to the end here in
  a fresh folder, with empty model caches that it must leave empty (nothing downloaded); one
  that imports an extra that ``.[dev]`` does not install (:data:`OPTIONAL_EXTRAS`) is skipped
  where that extra is missing.
- A shell block holds only commands this repository has: ``freekd ...`` lines parse with the
  command line's own parser (and name recipes that exist; the jobs themselves run in
  ``tests/test_pipeline_e2e.py``), ``make`` targets exist, ``python benchmarks/x.py --flag``
  names a script and flags it has, ``pip install`` names extras the package declares.
- The ``yaml`` block of the configuration schema (docs/cli.md) is a valid configuration.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from freekd.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL = ("sh", "bash", "shell", "console")


def code_blocks(languages: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(where, text)`` of every fenced block in one of ``languages``; ``where`` is
    ``README.md:12`` (the line of the opening fence)."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) in languages:
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((f"{doc.relative_to(ROOT)}:{line}", match.group(2)))
    return blocks


def example_body(path: Path) -> str:
    """The script less its module docstring (and the blank lines after it)."""
    text = path.read_text(encoding="utf-8")
    first = ast.parse(text).body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant), (
        f"{path.name} must start with a docstring saying where it is shown"
    )
    return "".join(text.splitlines(keepends=True)[first.end_lineno :]).lstrip("\n")


def test_every_python_block_is_an_example_script():
    bodies = {example_body(path): path for path in EXAMPLES}
    missing = [where for where, text in code_blocks(("python", "py")) if text not in bodies]
    assert not missing, (
        f"these Python blocks are no script of examples/ (copy each, as it is, after a "
        f"docstring into examples/<name>.py, or make the block equal to its script): {missing}"
    )


def test_every_example_is_shown_or_linked():
    shown = {text for _, text in code_blocks(("python", "py"))}
    docs = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    for path in EXAMPLES:
        linked = f"examples/{path.name}" in docs
        assert example_body(path) in shown or linked, f"examples/{path.name} is in no doc"


OPTIONAL_EXTRAS = {"ultralytics": "ultralytics"}
"""Modules of extras that ``make test`` (``.[dev]``) does not install -> the extra: an example
importing one is skipped where it is missing (and runs where it is installed)."""


def _imported_modules(script: Path) -> set[str]:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_the_example_runs_offline(script, tmp_path):
    for module in sorted(_imported_modules(script) & set(OPTIONAL_EXTRAS)):
        pytest.importorskip(module, reason=f"pip install 'freekd[{OPTIONAL_EXTRAS[module]}]'")
    caches = {name: tmp_path / name for name in ("TORCH_HOME", "HF_HOME")}  # model downloads
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({name: str(path) for name, path in caches.items()}, OMP_NUM_THREADS="1")
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"))  # torch and timm default there too
    caches.update({f"cache/{name}": tmp_path / "cache" / name for name in ("torch", "huggingface")})
    env.update(HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name, path in caches.items():  # nothing fetched into a cache
        files = [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
        assert not files, f"{script.name} wrote into {name}: {files[:3]}"


# ---------------------------------------------------------------------------- shell blocks


def _commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines
    dropped, a leading ``$ `` prompt removed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        line = re.sub(r"\s+#.*$", "", line) if not line.startswith("#") else ""
        if line:
            commands.extend(part.strip() for part in line.split("&&"))
    return commands


def _unparsed(context: Any) -> list[str]:
    """What a group's context left for its subcommand (``_protected_args`` from click 8.2)."""
    protected = getattr(context, "_protected_args", None)
    if protected is None:
        protected = getattr(context, "protected_args", [])
    return [*protected, *context.args]


def _check_freekd(args: list[str], where: str) -> None:
    """Parse ``freekd ARGS`` with the command line's parser (``--help`` and ``--version`` stop
    the parse with exit status 0)."""
    try:
        _parse_freekd(args, where)
    except typer.Exit as stop:
        assert stop.exit_code == 0, f"{where}: freekd {' '.join(args)} exits {stop.exit_code}"


def _parse_freekd(args: list[str], where: str) -> None:
    group = typer.main.get_command(app)
    with group.make_context("freekd", list(args), resilient_parsing=False) as context:
        command = group
        rest = _unparsed(context)
        while hasattr(command, "resolve_command") and rest:
            name, command, rest = command.resolve_command(context, rest)
            assert command is not None, f"{where}: freekd has no command {name!r}"
            context = command.make_context(name, rest, parent=context)
            rest = _unparsed(context)
        assert not rest, f"{where}: freekd {' '.join(args)}: arguments left over: {rest}"
        config = context.params.get("config")
        if config is not None and str(config).startswith("configs/"):
            assert (ROOT / str(config)).is_file(), f"{where}: {config} does not exist"
        if config is not None and str(config).startswith("recipe:"):
            assert (ROOT / "configs" / f"{str(config)[7:]}.yaml").is_file(), where


def _check_command(command: str, where: str) -> None:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    program, args = words[0], words[1:]
    if program.endswith("freekd"):
        _check_freekd(args, where)
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert args and all(a in targets for a in args), f"{where}: no make target {args}"
    elif re.fullmatch(r"(\.venv/bin/)?python3?", program) and args[:2] == ["-m", "venv"]:
        pass
    elif re.fullmatch(r"(\.venv/bin/)?python3?", program):
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {args[0]} does not exist"
        source = script.read_text(encoding="utf-8")
        for flag in (a.split("=")[0] for a in args[1:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{where}: {args[0]} has no option {flag}"
    elif re.fullmatch(r"(\.venv/bin/)?pip3?", program) and args[:1] == ["install"]:
        tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        for package in args[1:]:
            for extra in re.findall(r"\[([\w,]+)\]", package):
                for name in extra.split(","):
                    assert name in extras, f"{where}: the package has no extra {name!r}"
    else:
        pytest.fail(f"{where}: {command!r} is no command this test knows how to check")


@pytest.mark.parametrize(
    "where, text", code_blocks(SHELL), ids=[where for where, _ in code_blocks(SHELL)]
)
def test_shell_block_commands_exist(where, text):
    for command in _commands(text):
        _check_command(command, where)


def test_text_blocks_that_show_a_freekd_command_parse():
    for where, text in code_blocks(("text", "")):
        for line in text.splitlines():
            if line.startswith("$ freekd "):
                _check_command(line[2:], where)


def test_the_configuration_schema_block_is_a_valid_configuration(tmp_path):
    from freekd.pipeline import load_config

    (schema,) = [text for where, text in code_blocks(("yaml",)) if where.startswith("docs/cli")]
    path = tmp_path / "schema.yaml"
    path.write_text(schema, encoding="utf-8")
    config = load_config(path)
    assert config.task == "segmentation" and config.distill.preset == "recommended"
