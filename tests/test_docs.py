"""The project's documentation holds together: links resolve, cited anchors exist, and nothing
points to documents outside the repository.

Links are read from the *rendered* Markdown (markdown-it-py, CommonMark), so a link inside a code
block is not a link, and anchors follow GitHub's heading slugs: the heading's text, lowercased,
every character that is not a letter, digit, ``-``, ``_`` or space dropped, spaces turned into
``-``, and ``-1``, ``-2`` … appended to repeats.
"""

from __future__ import annotations

import re
import subprocess
import unicodedata
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[1]
_MD = MarkdownIt("commonmark").enable("table")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# A citation of the project's own docs in source code: docs/<file>.md or examples/<file>.md,
# optionally with an anchor.
_CITATION = re.compile(r"\b((?:docs|examples)/[\w./-]*\w\.md)(?:#([\w-]+))?")


@cache
def tracked_files() -> frozenset[str]:
    """Every file git tracks (paths relative to the repository root, ``/``-separated)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return frozenset(p for p in out.decode().split("\0") if p)


def _tracked_dirs() -> frozenset[str]:
    dirs = set()
    for path in tracked_files():
        dirs.update(str(parent) for parent in PurePosixPath(path).parents if str(parent) != ".")
    return frozenset(dirs)


def markdown_files() -> list[str]:
    """README.md, docs/*.md and examples/*.md among the tracked files."""
    return sorted(
        p
        for p in tracked_files()
        if p == "README.md" or re.fullmatch(r"(docs|examples)/[^/]+\.md", p)
    )


def slug(text: str) -> str:
    """GitHub's anchor for a heading whose rendered text is ``text``."""
    kept = []
    for ch in text.strip().lower():
        category = unicodedata.category(ch)
        if ch in "-_ " or category[0] in "LN" or category.startswith("M"):
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def _inline_text(token: Token) -> str:
    return "".join(child.content for child in token.children or [] if child.type != "softbreak")


@cache
def anchors(path: str) -> frozenset[str]:
    """The anchors GitHub gives the headings of the Markdown file ``path``."""
    tokens = _MD.parse((ROOT / path).read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for i, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        base = slug(_inline_text(tokens[i + 1]))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def _links(tokens: list[Token]) -> list[str]:
    links = []
    for token in tokens:
        if token.type == "link_open":
            links.append(str(token.attrs["href"]))
        elif token.type == "image":
            links.append(str(token.attrs["src"]))
        if token.children:
            links.extend(_links(token.children))
    return links


def rendered_links(path: str) -> list[str]:
    """Every link and image target of the rendered Markdown file ``path``."""
    return _links(_MD.parse((ROOT / path).read_text(encoding="utf-8")))


def link_problem(source: str, target: str) -> str | None:
    """Why the relative link ``target`` written in ``source`` does not resolve, or ``None``."""
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # an external link: not checked here (no network in the tests)
    path_part, _, anchor = target.partition("#")
    if path_part:
        resolved = (PurePosixPath(source).parent / path_part).as_posix()
        parts: list[str] = []
        for part in resolved.split("/"):
            if part == "..":
                if not parts:
                    return f"{target!r} leaves the repository"
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        resolved = "/".join(parts)
        if resolved not in tracked_files() and resolved not in _tracked_dirs():
            return f"{target!r}: {resolved} is not a tracked file"
    else:
        resolved = source
    if anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
        return f"{target!r}: no heading with the anchor #{anchor} in {resolved}"
    return None


def test_slug_follows_github() -> None:
    assert slug("Notation and the LoRA convention") == "notation-and-the-lora-convention"
    assert slug("lora-fair") == "lora-fair"
    assert slug("Theory: predict rank collapse (Theorem 4.4)") == (
        "theory-predict-rank-collapse-theorem-44"
    )
    assert slug("Per-level `accuracy@r`") == "per-level-accuracyr"
    assert slug("snake_case stays") == "snake_case-stays"


def test_outside_pattern() -> None:
    spec, design, shared = "SP" + "EC", "DES" + "IGN", "../" + "shared"
    for text in (f"see {spec} §3", f"({design} layer 6)", f'{design} "x"', f"{shared}/x"):
        assert _OUTSIDE.search(text), text
    for text in (f"{spec}S = (", "specification", "design.md#layers", "../docs/shared.md"):
        assert not _OUTSIDE.search(text), text


def test_link_checker_catches_bad_links() -> None:
    # the checker itself: a missing file, a missing anchor and an escape are each reported
    assert link_problem("README.md", "docs/no-such-file.md")
    assert link_problem("README.md", "docs/methods.md#no-such-heading")
    assert link_problem("docs/methods.md", "../../outside.md")
    assert link_problem("README.md", "#no-such-heading-here")
    assert link_problem("README.md", "https://example.org/x") is None


def test_markdown_files_exist() -> None:
    files = markdown_files()
    for required in ("README.md", "docs/design.md", "docs/methods.md", "docs/flower.md"):
        assert required in files


@pytest.mark.parametrize("path", markdown_files() if (ROOT / ".git").exists() else [])
def test_relative_links_resolve(path: str) -> None:
    problems = [p for t in rendered_links(path) if (p := link_problem(path, t)) is not None]
    assert not problems, f"{path}:\n" + "\n".join(problems)


def _python_sources() -> list[str]:
    return sorted(
        p
        for p in tracked_files()
        if p.endswith(".py") and p.split("/")[0] in ("src", "benchmarks", "scripts", "examples")
    )


def test_doc_citations_in_sources_resolve() -> None:
    problems = []
    cited = 0
    for path in _python_sources():
        text = (ROOT / path).read_text(encoding="utf-8")
        for match in _CITATION.finditer(text):
            cited += 1
            target = match.group(1) + (f"#{match.group(2)}" if match.group(2) else "")
            # citations are written from the repository root, whatever the citing file
            problem = link_problem("README.md", target)
            if problem:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{path}:{line}: {problem}")
    assert cited > 0, "no source file cites the docs: the pattern is wrong"
    assert not problems, "\n".join(problems)


# The project notes kept outside the repository, as sources used to cite them: their names as
# whole upper-case words (a section sign, "layer n" or a quoted title may follow; a longer word
# such as the plural is no match), or a relative link into the folder beside the repository.
# Spelled in pieces so that this file does not match itself.
_OUTSIDE = re.compile(
    r"\b(?:" + "SP" + "EC|" + "DES" + "IGN|" + "ENVIRON" + r"MENT)\b|\.\./" + "shared"
    r"|\b[Ii]" + r"ssue \d"
)


def test_no_reference_to_documents_outside_the_repository() -> None:
    problems = []
    for path in sorted(tracked_files()):
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files (figures, checkpoints) and files deleted but not committed
        for match in _OUTSIDE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{path}:{line}: {match.group()!r}")
    assert not problems, f"{len(problems)} references:\n" + "\n".join(problems)


def _fences_after(path: str, heading: str) -> list[Token]:
    """The fenced code blocks of ``path`` under the heading whose text is ``heading``."""
    tokens = _MD.parse((ROOT / path).read_text(encoding="utf-8"))
    fences: list[Token] = []
    inside = False
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            inside = _inline_text(tokens[i + 1]) == heading
        elif inside and token.type == "fence":
            fences.append(token)
    return fences


def test_readme_example_prints_what_the_readme_shows(capsys: pytest.CaptureFixture[str]) -> None:
    # The front page's example is run as written and its output compared with the block under it.
    fences = _fences_after("README.md", "Example")
    code = [f.content for f in fences if f.info.strip() == "python"]
    shown = [f.content for f in fences if f.info.strip() == "text"]
    assert len(code) == 1 and len(shown) == 1
    assert len([line for line in code[0].splitlines() if line.strip()]) <= 12
    exec(compile(code[0], "README.md:Example", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out == shown[0]
