"""The documentation: the site builds offline with no warning (``mkdocs build --strict``: every nav page exists,
every link and included file resolves, every API page renders from the docstrings), and the README stays short
and self-contained."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_the_site_builds_strictly(tmp_path):
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "FineGrainedNetwork" in api and "build_head" in api  # rendered from the docstrings
    assert not re.search(r":(func|class|meth|mod|attr):<code>", api)  # Sphinx roles shown as plain code
    assert "Unreleased" in (tmp_path / "site" / "changelog" / "index.html").read_text()  # CHANGELOG.md included
    # the benchmark page shows the table file bench-table wrote, not a copy of it
    bench = open(os.path.join(REPO_ROOT, "results", "tables", "bench_fashion_mnist.md"), encoding="utf-8").read()
    first_row = next(line for line in bench.splitlines() if line.startswith("| ") and "Method" not in line)
    method = first_row.split("|")[1].strip()
    page = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert bench.splitlines()[0].lstrip("# ").split(":")[0] in page and f">{method}</td>" in page
    # every head's arguments as a parameter table (a class docstring whose Args: is not a section shows as prose)
    from finegrained.heads import available_heads
    for name in available_heads():
        assert "Parameters:" in (tmp_path / "site" / "methods" / name / "index.html").read_text(), name
    # and every CSV that finegrained bench wrote, with when and where it was measured
    for name in sorted(os.listdir(os.path.join(REPO_ROOT, "results", "bench"))):
        assert f"results/bench/{name}</code>: measured " in page, name


def test_the_readme_is_short_and_links_only_to_files_that_exist():
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(REPO_ROOT, target)), target


METHODS = os.path.join(REPO_ROOT, "docs", "methods")


def _method_pages():
    from finegrained.heads import available_heads
    return {name: open(os.path.join(METHODS, f"{name}.md"), encoding="utf-8").read() for name in available_heads()}


def test_every_head_has_a_methods_page_in_the_navigation():
    from finegrained.heads import available_heads, head_paper
    nav = open(os.path.join(REPO_ROOT, "mkdocs.yml"), encoding="utf-8").read()
    pages = {f[:-3] for f in os.listdir(METHODS) if f.endswith(".md")} - {"index"}
    assert pages == set(available_heads())
    index = open(os.path.join(METHODS, "index.md"), encoding="utf-8").read()
    for name, text in _method_pages().items():
        assert f"methods/{name}.md" in nav and f"]({name}.md)" in index, name
        for row in ("| paper to cite |", "| official code |", "| output dimension |"):
            assert row in text, (name, row)
        assert f"| paper to cite | {head_paper(name)} |" in text, name  # the head's paper, as model cards cite it
        assert f"::: finegrained.heads." in text and "## How it was checked" in text, name


def test_the_output_dimensions_the_methods_pages_state_are_the_heads():
    import doctest
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name, text in _method_pages().items():
        examples = "\n\n".join(re.findall(r"```pycon\n(.*?)```", text, re.S))
        test = parser.get_doctest(examples, {}, name, f"docs/methods/{name}.md", 0)
        assert len(test.examples) >= 2, name  # the import and the output_dim
        result = runner.run(test, out=lambda s: None)
        assert result.failed == 0, f"docs/methods/{name}.md: its example's output dimension is not the head's"


def test_the_tests_the_methods_pages_cite_exist():
    cited = 0
    for name, text in _method_pages().items():
        file = None
        for path, test in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", text):
            if not path and not test:
                continue
            file = path or file  # "::name" alone is a test of the file cited before it
            source = open(os.path.join(REPO_ROOT, file), encoding="utf-8").read()
            if test:
                assert re.search(rf"^def {test}\(", source, re.M), f"docs/methods/{name}.md: {file}::{test}"
                cited += 1
    assert cited >= 40


def test_no_tracked_file_cites_a_file_outside_the_repository():
    """A clone is all a user has: no file may point to notes kept beside the repository."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    # Spelled in pieces so that this file does not match itself.
    outside = re.compile("|".join(["shared" + "/", "protocols" + "-official", "methods-after" + "-seed",
                                   "datasets" + "-more"]))
    found = []
    for path in listed.stdout.splitlines():
        full = os.path.join(REPO_ROOT, path)
        if os.path.splitext(path)[1] not in {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".txt", ".sh", ".csv",
                                             ".cff", ".html", ""} or not os.path.isfile(full):
            continue
        with open(full, encoding="utf-8", errors="replace") as f:
            found += [f"{path}:{i}" for i, line in enumerate(f, 1) if outside.search(line)]
    assert not found, found


def _bench_hook():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_csv", os.path.join(REPO_ROOT, "docs_hooks", "bench_csv.py"))
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_a_bench_csv_is_shown_with_when_and_where_it_was_measured(tmp_path):
    hook = _bench_hook()
    csv = tmp_path / "heads_cuda.csv"
    csv.write_text("case,median_ms,vs_(a),torch,finegrained,gpu,timestamp\n"
                   "fused,2.368356,0.7127,2.14.1,1.0,NVIDIA H100,2026-12-01T03:09:51+00:00\n"
                   "(b) official,4.4,1.33,2.14.1,1.0,NVIDIA H100,2026-12-01T03:09:51+00:00\n"
                   "eigh,38.8009,,2.14.1,1.0,NVIDIA H100,2026-12-02T03:09:52+00:00\n")
    text = hook.bench_table(str(csv), "case, median_ms, vs_(a)", "(b)")
    header, _, table = text.partition("\n\n")
    # the version as written (pandas reads 1.0 as a number), both days, the rows without "(b)"
    assert header == f"*`{csv}`: measured 2026-12-01, 2026-12-02 on NVIDIA H100; torch 2.14.1, finegrained 1.0.*"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()]
    assert rows[0] == ["case", "median_ms", "vs_(a)"]
    assert rows[2:] == [["fused", "2.37", "0.713"], ["eigh", "38.8", ""]]  # 3 significant digits; NaN left empty
    page = f"before\n<!-- bench-csv: {csv.name} | case --> \nafter"  # a trailing space is no reason to fail
    shown = hook.render(page, str(tmp_path), "bench.md")
    assert shown.startswith("before\n*`heads_cuda.csv`: measured 2026-12-01") and "| fused " in shown


@pytest.mark.parametrize("content,marker,expected", [
    (None, "<!-- bench-csv: x.csv -->", "x.csv: expected a CSV written by finegrained bench"),
    ("", "<!-- bench-csv: x.csv -->", "x.csv: expected a CSV written by finegrained bench"),
    ("case,torch,timestamp\n", "<!-- bench-csv: x.csv -->", "x.csv: expected rows"),
    ("case,torch\na,2\n", "<!-- bench-csv: x.csv -->", "missing: timestamp"),
    ("case,torch,timestamp\na,2,2026\n", "<!-- bench-csv: x.csv | speedup -->", "x.csv: no column speedup"),
    ("case,torch,timestamp\na,2,2026\n", "<!-- bench_csv: x.csv -->", "bench.md:2: expected <!-- bench-csv: PATH"),
    ("case,torch,timestamp\na,2,2026\n", "<!-- bench-csv: x.csv  | case -->", "bench.md:2: expected"),
])
def test_a_bench_csv_or_marker_that_cannot_serve_stops_the_build_with_one_line(tmp_path, content, marker, expected):
    from mkdocs.exceptions import PluginError
    hook = _bench_hook()
    if content is not None:
        (tmp_path / "x.csv").write_text(content)
    with pytest.raises(PluginError) as raised:
        hook.render(f"text\n{marker}\n", str(tmp_path), "bench.md")
    message = str(raised.value)
    assert message.startswith("error: bench.md:2: ") and expected in message and "\n" not in message
