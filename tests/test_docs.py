"""The docs and the help agree with what the code does, and the docs stand on their own."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.anchors.index import slugify

from proxy_tcp.listeners import DEFAULT_LISTENERS
from pvtap.config import ListenerConfig
from pvtap.ingest.framing import Outcome

from .conftest import REPO


def _help(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PVTAP_")}
    done = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, env=env, check=True)
    return done.stdout


def _expected_words(listener: ListenerConfig) -> list[str]:
    words = [listener.protocol, listener.transport, listener.listen]
    if listener.transport == "udp":
        return [*words, "listen only"]
    if listener.policy == "local":
        return [*words, "local"]
    return [*words, listener.policy, listener.upstream]


@pytest.mark.parametrize("argv", [["-m", "pvtap", "relay"], ["-m", "proxy_tcp"], ["-m", "pvtap", "run"]])
def test_help_lists_every_default_listener(argv: list[str]) -> None:
    text = _help(*argv)
    lines = [line.strip() for line in text.splitlines()
             if re.match(r"\s+(alphaess|foxess)\s+(tcp|udp)\s", line)]
    assert len(lines) == len(DEFAULT_LISTENERS)
    for line, listener in zip(lines, DEFAULT_LISTENERS):
        for word in _expected_words(listener):
            assert word in line, f"{word!r} missing from the help's line {line!r}"
        assert ("tls" in line.split("→")[0]) == bool(listener.tls_cert)
        assert ("pinned" in line) == bool(listener.upstream_pin_sha256)


def test_relay_doc_lists_every_connection_outcome() -> None:
    text = (REPO / "docs" / "relay.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| tag | `outcome` |")]
    listed = re.findall(r"`([a-z_]+)`", row.split("|")[3])
    assert sorted(listed) == sorted(Outcome), "docs/relay.md's outcome row and pvtap.ingest.framing.Outcome differ"


def test_relay_doc_lists_every_default_listener() -> None:
    text = (REPO / "docs" / "relay.md").read_text()
    table = text[text.index("| Protocol | Transport | Listen | Policy | Upstream |"):]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    assert [row[:5] for row in rows] == [
        [x.protocol, x.transport, x.listen, x.policy, x.upstream or "—"] for x in DEFAULT_LISTENERS]


# -- the docs stand on their own -------------------------------------------------------------------

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "firewall" / "README.md",
               REPO / "certs" / "README.md"])


def _parse(text: str) -> list:
    return MarkdownIt("commonmark").parse(text)


def _links(tokens: list) -> list[str]:
    found = []
    for token in tokens:
        if token.type == "link_open":
            found.append(str(token.attrGet("href")))
        if token.children:
            found.extend(_links(token.children))
    return found


def _anchors(text: str) -> set[str]:
    """The heading anchors GitHub gives a Markdown text (a repeated heading gets -1, -2, ...)."""
    tokens = _parse(text)
    seen: dict[str, int] = {}
    anchors = set()
    for opening, inline in itertools.pairwise(tokens):
        if opening.type == "heading_open":
            slug = slugify(inline.content)
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(doc: Path, text: str) -> list[str]:
    """Each relative link of `text` (the Markdown of `doc`) that names no file of the repository,
    or no heading of it."""
    broken = []
    for href in _links(_parse(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", href) or href.startswith("//"):  # https:, mailto: ...
            continue
        target, _, anchor = href.partition("#")
        path = (doc.parent / urllib.parse.unquote(target)).resolve() if target else doc
        if not path.is_relative_to(REPO) or not path.exists():
            broken.append(f"{href}: no such file in the repository")
        elif anchor and path.suffix == ".md":
            headings = _anchors(text if path == doc else path.read_text(encoding="utf-8"))
            if anchor not in headings:
                broken.append(f"{href}: no heading #{anchor} in {path.relative_to(REPO)}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_and_anchor_in_the_repository(doc: Path) -> None:
    assert broken_links(doc, doc.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_docs_point_to_nothing_outside_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    assert "shared/reference" not in text and "/work/" not in text


def test_the_link_check_finds_broken_links() -> None:
    """The check above can fail: a missing file, a missing anchor, a link out of the repository."""
    text = ("# Title\n\n## Title\n\n[ok](#title) [again](#title-1) [gone](nope.md) [bad](relay.md#no-such-heading) "
            "[out](../../shared/x.md) [fine](relay.md#tls-and-udp) `[code](skipped.md)` [web](https://example.org)\n")
    assert broken_links(REPO / "docs" / "design.md", text) == [
        "nope.md: no such file in the repository",
        "relay.md#no-such-heading: no heading #no-such-heading in docs/relay.md",
        "../../shared/x.md: no such file in the repository"]
