"""The repository stands on its own: every relative link of README.md and docs/ resolves, and no file points
at documents outside the repository."""

import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Names of the planning documents that live outside the repository (spelled in pieces so that this file does not
# match itself).
OUTSIDE = [re.compile(p) for p in (r"DESIGN" + r"\.md", r"(?<![\w/])spec/(METHOD|DATA|QWEN3VL)", r"\.\./" + "shared",
                                   r"/work/" + "shared", r"(METHOD|QWEN3VL)" + r"\.md")]


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [path for path in out.splitlines() if os.path.isfile(os.path.join(REPO, path))]


def markdown_files():
    docs = [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(REPO, "docs")))
            if name.endswith(".md")]
    return ["README.md"] + docs


def test_docs_has_its_pages():
    pages = set(os.listdir(os.path.join(REPO, "docs")))
    assert {"method.md", "architecture.md", "data.md", "performance.md", "reliability.md", "study.md"} <= pages


def test_every_relative_link_resolves():
    broken = []
    for page in markdown_files():
        text = open(os.path.join(REPO, page), encoding="utf-8").read()
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), target.split("#", 1)[0]))
            if not path.startswith(REPO) or not os.path.exists(path):
                broken.append(f"{page}: {target}")
    assert not broken, "links that do not resolve:\n" + "\n".join(broken)


def test_no_file_names_documents_outside_the_repository():
    found = []
    for path in tracked_files():
        if path == "tests/test_docs.py" or path.endswith((".png", ".jpg", ".parquet")):
            continue
        try:
            text = open(os.path.join(REPO, path), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if any(p.search(line) for p in OUTSIDE):
                found.append(f"{path}:{number}: {line.strip()[:120]}")
    assert not found, "files naming documents outside the repository:\n" + "\n".join(found)


def test_readme_is_a_front_page():
    lines = open(os.path.join(REPO, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; details belong in docs/"


def test_every_test_the_docs_name_exists():
    """`test_x.py::test_name` and the `::test_name` that follow it (same file) name tests that exist: a renamed
    test leaves no stale pointer in the docs."""
    missing = []
    for page in markdown_files():
        for number, line in enumerate(open(os.path.join(REPO, page), encoding="utf-8"), start=1):
            current = None
            for file_name, test_name in re.findall(r"(test_\w+\.py)?::(test_\w+)", line):
                current = file_name or current
                if current is None:
                    continue
                path = os.path.join(REPO, "tests", current)
                source = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
                if not re.search(rf"^def {test_name}\b", source, re.M):
                    missing.append(f"{page}:{number}: {current}::{test_name}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)
