"""The documentation site (mkdocs.yml, docs/) builds in strict mode, and its reference pages cannot go stale: every
flag of every command is in docs/cli.md, every path of docs/architecture.md's tree exists (and every module is in
it), every name the package exports is on docs/python.md, and the README's links and test command match the
repository."""

import argparse
import glob
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmdrop
from llmdrop.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _section(text: str, title: str) -> str:
    """The text of the `## title` section of a Markdown page, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def _code_block(text: str) -> str:
    """The first fenced code block of `text`."""
    match = re.search(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    assert match, "no code block"
    return match.group(1)


def _commands() -> dict[str, set[str]]:
    """Every subcommand of the CLI with its long option flags (--help left out)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for action in sub._actions for s in action.option_strings if s.startswith("--")} - {"--help"}
            for name, sub in subparsers.choices.items()}


def _top_level_flags() -> set[str]:
    return {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def test_site_builds_in_strict_mode(tmp_path):
    """mkdocs build --strict: a broken link or anchor, a page left out of the nav or a module the API reference
    names that is gone fails the build."""
    missing = [m for m in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    api = (site / "api" / "index.html").read_text()
    for module in re.findall(r"^::: (\S+)", (DOCS / "api.md").read_text(), re.M):
        assert f'id="{module}"' in api, f"the API reference rendered nothing for {module}"


def test_api_reference_names_existing_modules():
    """Each `::: module` of docs/api.md is a module of src/ (checked without mkdocs, too)."""
    modules = re.findall(r"^::: (\S+)", (DOCS / "api.md").read_text(), re.M)
    assert "llmdrop" in modules
    for module in modules:
        base = ROOT / "src" / Path(*module.split("."))
        assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), f"{module} is not in src/"


def test_every_cli_flag_is_in_the_command_line_page():
    text = (DOCS / "cli.md").read_text()
    documented = set(FLAG.findall(text))
    for name, flags in _commands().items():
        assert not flags - documented, f"llmdrop {name}: {sorted(flags - documented)} missing from docs/cli.md"
    assert not _top_level_flags() - documented


def test_synopsis_lists_each_commands_flags_and_no_others():
    """Per command: its synopsis entry plus the common options hold exactly its flags, so a flag added, renamed or
    removed shows up here."""
    text = (DOCS / "cli.md").read_text()
    common = set(re.findall(r"^- `(?:-\w/)?(--[a-z][a-z0-9-]*)", _section(text, "Common options"), re.M))
    assert {"--dtype", "--quiet"} <= common
    entries: dict[str, str] = {}
    for line in _code_block(_section(text, "Synopsis")).splitlines():
        if line.startswith("llmdrop "):
            name = line.split()[1]
            entries[name] = ""
        entries[name] += line + "\n"
    commands = _commands()
    assert set(entries) == set(commands) | {"--version"}, "one synopsis entry per command"
    assert set(FLAG.findall(entries.pop("--version"))) <= _top_level_flags()
    for name, entry in entries.items():
        listed = set(FLAG.findall(entry))
        assert not commands[name] - listed - common, f"llmdrop {name}: {sorted(commands[name] - listed - common)} " \
                                                     "are in neither its synopsis nor the common options"
        assert not listed - commands[name], f"llmdrop {name} has no {sorted(listed - commands[name])}"
    assert all(any(flag in flags for flags in commands.values()) for flag in common)


def _tree_paths() -> list[str]:
    """The paths of docs/architecture.md's tree: an unindented line starts with a path from the repository root (a
    directory ends with /), a line indented by two spaces with a path inside the last directory; deeper lines
    continue a description."""
    paths, folder = [], ""
    for line in _code_block((DOCS / "architecture.md").read_text()).splitlines():
        if not line.strip() or line.startswith("   "):
            continue
        entry = line.split()[0]
        if line.startswith("  "):
            paths.append(folder + entry)
        else:
            paths.append(entry)
            folder = entry if entry.endswith("/") else folder
    return paths


def test_architecture_tree_paths_exist():
    paths = _tree_paths()
    assert "src/llmdrop/cli.py" in paths and "scripts/setup.sh" in paths
    for path in paths:
        assert glob.glob(str(ROOT / path)), f"docs/architecture.md names {path}, which does not exist"


def test_architecture_tree_lists_every_module():
    """The other way round: a module added under src/llmdrop/ is added to the tree too."""
    paths = set(_tree_paths())
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "src" / "llmdrop").rglob("*.py"))
    missing = [m for m in modules if m not in paths]
    assert not missing, f"docs/architecture.md's tree lacks {missing}"


def test_python_page_lists_every_export():
    """The table of exported names on docs/python.md: every name llmdrop exports, with the module it comes from."""
    rows = [line.split("|")[1:3] for line in (DOCS / "python.md").read_text().splitlines()
            if line.startswith("| `")]
    listed = {name: module.strip().strip("`") for names, module in rows for name in re.findall(r"`(\w+)`", names)}
    for name in llmdrop.__all__:
        module = llmdrop._EXPORTS[name][0] if name in llmdrop._EXPORTS else name
        assert listed.get(name) == f"llmdrop.{module}", f"{name} (from llmdrop.{module}) is not listed in docs/python.md"


def test_readme_links_and_test_command():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", readme):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{command}\n" in readme, "README.md must show exactly the test command CI runs (.ci/run)"
