"""The README and docs/*.md: relative links lead to files and headings that exist, and the CLI flags they name exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sim.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
# Pages whose flags are all tokenstep's: the others also quote llama.cpp's, vLLM's and benchmark scripts' flags.
FLAG_PAGES = ["README.md", "docs/CLI.md", "docs/SERVING.md", "docs/STUDIES.md", "docs/ACCURACY.md"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_flag_the_docs_name_exists():
    _, subparsers = build_parser()
    known = {flag for p in subparsers.values() for flag in p._option_string_actions}
    missing = {name: sorted(set(FLAG.findall((ROOT / name).read_text(encoding="utf-8"))) - known)
               for name in FLAG_PAGES}
    assert not any(missing.values()), {k: v for k, v in missing.items() if v}


@pytest.mark.parametrize("command, page", [("serve", "docs/SERVING.md"), ("bench", "docs/BENCH.md")])
def test_the_usage_lines_of_serve_and_bench_name_their_own_flags(command, page):
    _, subparsers = build_parser(command)
    if command not in subparsers:
        pytest.skip(f"{command} needs the serve extra")
    known = set(subparsers[command]._option_string_actions)
    first_block = FENCE.search((ROOT / page).read_text(encoding="utf-8")).group(0)
    assert not set(FLAG.findall(first_block)) - known
