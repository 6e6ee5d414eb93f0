"""The documentation builds with `mkdocs build --strict`, and its generated references are complete.

The API page is generated from the .proto comments at build time; these tests read the names from the
.proto sources on their own (not through the docs hook), so a reference that loses an rpc, a message or
an enum fails here. The README is the site's home page and stays short: what it is, the two set-up
commands, a tour, and links into the docs.
"""

from __future__ import annotations

import dataclasses
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 15 * 1024
PROTOS = sorted((ROOT / "proto").rglob("*.proto"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _page_text(site: Path, page: str) -> str:
    return html.unescape((site / page / "index.html").read_text())


def _proto_names(keyword: str) -> set[str]:
    names: set[str] = set()
    for proto in PROTOS:
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        names |= set(re.findall(rf"^\s*{keyword}\s+(\w+)", text, flags=re.MULTILINE))
    return names


def test_the_api_page_lists_every_service_rpc_message_and_enum(site: Path) -> None:
    page = _page_text(site, "api")
    headings = set(re.findall(r'<h3 id="([^"]+)"', page))
    for kind in ("service", "message", "enum"):
        names = _proto_names(kind)
        assert names, f"no {kind} found in {PROTOS}"
        missing = {name for name in names if name.lower() not in headings}
        assert not missing, f"{kind}s without a section on the API page: {sorted(missing)}"
    rpcs = _proto_names("rpc")
    assert {"Submit", "Upload"} <= rpcs
    missing_rpcs = {rpc for rpc in rpcs if f"<td><code>{rpc}</code></td>" not in page}
    assert not missing_rpcs, f"rpcs missing from the API page: {sorted(missing_rpcs)}"
    # The protos' own comments are what the page says.
    assert "Ends a waiting request at once; stops a running one at its next denoising step." in page


def test_the_settings_page_lists_every_setting(site: Path) -> None:
    page = _page_text(site, "configuration")
    missing = [f.name for f in dataclasses.fields(Settings) if f"<code>{f.name}</code>" not in page]
    assert not missing, f"settings missing from the configuration page: {missing}"


def test_the_generated_references_are_not_committed_pages() -> None:
    """The docs hold markers where the build puts the references, never a copy that could go stale."""
    assert "<!-- generated: proto reference -->" in (DOCS / "api.md").read_text()
    assert "<!-- generated: settings reference -->" in (DOCS / "configuration.md").read_text()


def test_the_readme_is_short_and_opens_with_the_two_set_up_commands() -> None:
    readme = README.read_text()
    assert len(readme.encode()) <= README_MAX_BYTES, f"README.md is {len(readme.encode())} bytes; move detail into docs/"
    setup = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    assert "```sh\nbash scripts/demo.sh\n```" in setup
    assert "```sh\nbash scripts/test.sh\n```" in setup


def test_no_issue_numbers_in_the_readme_or_the_docs() -> None:
    """Issue numbers belong in the git log; a reader of the docs has no issue tracker to look them up in."""
    pages = [README, *sorted(DOCS.rglob("*.md")), DOCS / "hooks.py"]
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in pages
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if re.search(r"\bissues?\s*#?\d+|(?<![\w/])#\d+\b", line, flags=re.IGNORECASE)
    ]
    assert not found, "\n".join(found)


def test_every_docs_page_is_in_the_nav() -> None:
    """A page left out of mkdocs.yml's nav is built but found by no one (--strict warns about it too)."""
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name not in nav]
    assert not missing, missing
