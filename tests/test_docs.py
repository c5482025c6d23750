"""The documentation: the site builds offline with no warning (``mkdocs build --strict``: every nav page exists,
every link and included file resolves, every API page renders from the docstrings), and the README stays short
and self-contained."""
import os
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_site_builds_strictly(tmp_path):
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "FineGrainedNetwork" in api and "build_head" in api  # rendered from the docstrings
    assert "Unreleased" in (tmp_path / "site" / "changelog" / "index.html").read_text()  # CHANGELOG.md included
    # the benchmark page shows the table file bench-table wrote, not a copy of it
    bench = open(os.path.join(REPO_ROOT, "results", "tables", "bench_fashion_mnist.md"), encoding="utf-8").read()
    first_row = next(line for line in bench.splitlines() if line.startswith("| ") and "Method" not in line)
    method = first_row.split("|")[1].strip()
    page = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert bench.splitlines()[0].lstrip("# ").split(":")[0] in page and f">{method}</td>" in page


def test_the_readme_is_short_and_links_only_to_files_that_exist():
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(REPO_ROOT, target)), target
