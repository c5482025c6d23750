"""Reference numbers, run records, `finegrained tables`, plots and the CPU mini-benchmark."""
import csv
import os
import re

import pandas as pd
import pytest

from datamodules import fashion_mnist
from finegrained.cli import main
from finegrained.results.runs import RUN_FIELDS, append_run, read_runs
from finegrained.results.tables import load_reference, select_runs, write_tables
from tests.conftest import REPO_ROOT

REFERENCE = os.path.join(REPO_ROOT, "results", "reference.csv")

# The tutorial's fine-grained table, typed in again independently of results/reference.csv.
SEED_FINEGRAINED = {
    ("isqrt", "resnet50"): (88.1, 90.0, 92.8), ("cbp", "resnet50"): (81.6, 81.6, 88.6),
    ("kp", "resnet50"): (84.7, 85.7, 91.1), ("mpncov", "vgg16"): (87.2, 90.0, 92.5),
    ("netvlad", "vgg16"): (81.9, 81.8, 88.6), ("cbp", "vgg16"): (84.3, 84.1, 91.2),
    ("kp", "vgg16"): (86.2, 86.9, 92.4), ("lrbp", "vgg16"): (84.2, 87.3, 90.9),
    ("improved_bcnn", "vgg16"): (85.8, 88.5, 92.0), ("g2de", "vgg16"): (87.1, 89.0, 92.5),
    ("hihca", "vgg16"): (85.3, 88.3, 91.7), ("isqrt", "resnet101"): (88.7, 91.4, 93.3),
}


def test_reference_holds_the_seed_finegrained_table():
    ref = load_reference(REFERENCE)
    fg = ref[ref["table"] == "finegrained"]
    assert len(fg) == 3 * len(SEED_FINEGRAINED)
    for (method, backbone), values in SEED_FINEGRAINED.items():
        for dataset, value in zip(("cub", "aircraft", "cars"), values):
            row = fg[(fg.method == method) & (fg.backbone == backbone) & (fg.dataset == dataset)]
            assert row["value"].tolist() == [value]
    assert set(ref["table"]) >= {"finegrained", "fgvc_comparison", "imagenet_resnet", "gmsop_imagenet", "places365",
                                 "imagenet_alexnet", "imagenet64"}
    assert (ref["source"].str.len() > 20).all()
    places = ref[(ref.table == "places365") & (ref.method == "gmsop")]
    assert sorted(places["value"]) == [17.02, 47.18]


def cells(md_path):
    """{(method label, backbone label): [cell, ...]} from a generated markdown table."""
    lines = [line for line in open(md_path) if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|\n").split("|")]
    rows = {}
    for line in lines[2:]:
        values = [c.strip() for c in line.strip("|\n").split("|")]
        rows[(values[0], values[1], values[2])] = dict(zip(header[3:], values[3:]))
    return rows


def split_cell(cell):
    paper, rest = cell.split(" / ")
    ours = rest.split(" (")[0]
    num = lambda t: None if t.strip("*") == "—" else float(t.strip("*"))  # noqa: E731
    return num(paper), num(ours)


def test_tables_paper_column_equals_reference(tmp_path, capsys):
    (tmp_path / "none.csv").write_text(",".join(RUN_FIELDS) + "\n")  # no runs yet
    assert main(["tables", "--reference", REFERENCE, "--runs-csv", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "tables")]) == 0
    ref = load_reference(REFERENCE)
    for table in set(ref["table"]):
        assert os.path.isfile(tmp_path / "tables" / f"{table}.tex")
        rows = cells(tmp_path / "tables" / f"{table}.md")
        part = ref[ref["table"] == table]
        found = 0
        for row_key, row_cells in rows.items():
            for column, cell in row_cells.items():
                paper, ours = split_cell(cell)
                assert ours is None  # no runs: nothing of ours is shown
                if paper is not None:
                    found += 1
                    assert paper in set(part["value"])  # exactly as published, no rounding
        assert found == len(part), table  # every reference number appears, none invented


def test_table_from_two_fake_runs_shows_exactly_those_numbers(tmp_path):
    runs_csv = str(tmp_path / "runs.csv")
    append_run(runs_csv, {"recipe": "recipes/cub/isqrt_resnet50.yaml", "dataset": "cub", "method": "isqrt",
                          "backbone": "resnet50", "head_dim": 32896, "top1": 0.8512, "top5": 0.97,
                          "mean_class_acc": 0.85, "timestamp": "2026-01-01T00:00:00+00:00"})
    append_run(runs_csv, {"recipe": "recipes/aircraft/gap_vgg16.yaml", "dataset": "aircraft", "method": "gap",
                          "backbone": "vgg16", "head_dim": 512, "top1": 0.7, "top5": 0.9,
                          "mean_class_acc": 0.69, "timestamp": "2026-01-02T00:00:00+00:00"})
    out = tmp_path / "tables"
    assert main(["tables", "--reference", REFERENCE, "--runs-csv", runs_csv, "--out", str(out), "--plots"]) == 0
    rows = cells(out / "finegrained.md")
    ours_values = [(key, column, split_cell(cell)[1]) for key, row in rows.items() for column, cell in row.items()
                   if split_cell(cell)[1] is not None]
    assert sorted(ours_values) == sorted([(("MPN-COV (iSQRT-COV)", "ResNet-50", "32K"), "Birds", 85.1),
                                          (("GAP", "VGG-16", "512"), "Aircraft", 70.0)])
    assert rows[("MPN-COV (iSQRT-COV)", "ResNet-50", "32K")]["Birds"] == "88.1 / **85.1** (-3.0)"
    assert split_cell(rows[("GAP", "VGG-16", "512")]["Aircraft"]) == (None, 70.0)
    assert os.path.isfile(out / "accuracy_vs_dim.png")
    # Other tables have no matching runs: their "ours" column stays empty.
    for key, row in cells(out / "fgvc_comparison.md").items():
        assert all(split_cell(c)[1] is None for c in row.values())


def test_run_selection(tmp_path):
    path = str(tmp_path / "runs.csv")
    for k, (top1, ts) in enumerate([(0.5, "2026-01-01"), (0.7, "2026-01-02"), (0.6, "2026-01-03")]):
        append_run(path, {"run_id": f"r{k}", "recipe": "a.yaml", "dataset": "cub", "method": "gap",
                          "backbone": "vgg16", "head_dim": 512, "top1": top1, "timestamp": ts})
    append_run(path, {"run_id": "other", "recipe": "b.yaml", "dataset": "cub", "method": "bcnn", "backbone": "vgg16",
                      "head_dim": 262144, "top1": 0.9, "timestamp": "2026-01-01"})
    runs = read_runs(path)
    assert list(runs.columns) == RUN_FIELDS
    pick = lambda how: dict(zip(select_runs(runs, how)["recipe"], select_runs(runs, how)["top1"]))  # noqa: E731
    assert pick("latest") == {"a.yaml": 0.6, "b.yaml": 0.9}
    assert pick("best") == {"a.yaml": 0.7, "b.yaml": 0.9}
    assert pick("all")["a.yaml"] == pytest.approx(0.6)
    assert pick("r0,other") == {"a.yaml": 0.5, "b.yaml": 0.9}
    with pytest.raises(ValueError, match="unknown run ids"):
        select_runs(runs, "nope")


def test_append_run_refuses_a_foreign_csv(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected"):
        append_run(str(path), {"method": "gap"})


def test_test_run_is_recorded_with_plots(trained_run, tmp_path):
    recipe, ckpt, _ = trained_run
    runs_csv = str(tmp_path / "runs.csv")
    assert main(["test", "--config", recipe, "--ckpt_path", ckpt, "--runs_csv", runs_csv]) == 0
    rows = list(csv.DictReader(open(runs_csv)))
    assert len(rows) == 1
    row = rows[0]
    assert row["recipe"] == recipe and row["method"] == "isqrt" and row["backbone"] == "resnet18"
    assert row["dataset"] == "ImageFolderDataModule" or row["dataset"]
    assert int(row["head_dim"]) == 136 and int(row["epochs"]) == 1
    assert 0 <= float(row["top1"]) <= 1 and 0 <= float(row["mean_class_acc"]) <= 1
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", row["git_commit"])
    assert len(row["config_hash"]) == 12 and float(row["train_wall_s"]) > 0 and row["device"].startswith("cpu")
    plots = row["plots"].split(";")
    assert any(p.endswith("confusion_matrix.png") and os.path.isfile(p) for p in plots)
    log_dirs = os.path.dirname(os.path.dirname(ckpt))
    curves = [os.path.join(d, f) for d, _, files in os.walk(log_dirs) for f in files if f == "training_curves.png"]
    assert curves, "fit should save training curves with the run"
    history = pd.read_csv(os.path.join(os.path.dirname(curves[0]), "history.csv"))
    assert "val_top1" in history.columns and len(history) == 1


debian = pytest.mark.skipif(
    not os.path.isfile(os.path.join(fashion_mnist.DEBIAN_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist is not installed (make setup installs it as root)")


@debian
def test_bench_table_on_real_images_uses_its_cache(tmp_path, capsys):
    from finegrained.bench.table import bench_table

    args = dict(per_class=6, test_per_class=4, image_size=64, channels=8, epochs=1, cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / "bench"), val_per_class=3)
    table = bench_table(["gap", "bcnn", "netvlad"], **args)
    assert list(table["method"]) == ["gap", "bcnn", "netvlad"]
    assert table["top1"].between(0, 1).all() and list(table["dim"]) == [8, 64, 64 * 8]
    assert "features: wrote" in capsys.readouterr().out
    text = open(tmp_path / "bench.md").read()
    assert "| GAP" in text and "NetVLAD" in text and "logistic regression" in text and "Lightning fit" in text
    again = bench_table(["gap"], **args)
    assert "features: cached" in capsys.readouterr().out
    assert again["top1"].iloc[0] == table["top1"].iloc[0]


def test_committed_tables_are_exactly_what_the_code_writes(tmp_path, monkeypatch):
    """`finegrained tables` on a fresh clone (no run records yet) must leave results/tables/ unchanged."""
    root = os.path.abspath(os.path.join(REPO_ROOT, "results"))
    out = tmp_path / "tables"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "runs.csv").write_text(",".join(RUN_FIELDS) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["tables", "--reference", os.path.join(root, "reference.csv"), "--out", str(out)]) == 0
    written = sorted(os.listdir(out))
    assert written, "no tables written"
    for name in written:
        committed = os.path.join(root, "tables", name)
        assert os.path.isfile(committed), f"{name} is generated but not committed"
        assert open(committed, encoding="utf-8").read() == (out / name).read_text(encoding="utf-8"), name
    generated_by_bench_table = {"bench_fashion_mnist.md"}
    committed_tables = {n for n in os.listdir(os.path.join(root, "tables")) if n.endswith((".md", ".tex"))}
    assert committed_tables - set(written) <= generated_by_bench_table


def test_a_column_prints_the_decimals_the_paper_prints(tmp_path):
    reference = tmp_path / "reference.csv"
    header = "table,method,backbone,dim,dataset,metric,value,source,classifier,note\n"
    rows = ["t,gap,resnet50,,imagenet,top1_err,24.7,paper A,,", "t,sort,resnet50,,imagenet,top1_err,23.82,paper A,,",
            "t,gap,resnet50,,imagenet,time_ms,21.3,paper A,,", "t,eig,resnet50,,imagenet,time_ms,1.80,paper A,,",
            "t,gap,resnet50,,imagenet,memory,0.505,paper A,,", "t,sort,resnet50,,imagenet,memory,1.1,paper A,,"]
    reference.write_text(header + "\n".join(rows) + "\n")
    runs_csv = str(tmp_path / "runs.csv")
    append_run(runs_csv, {"run_id": "r1", "timestamp": "2026-01-01T00:00:00", "recipe": "x", "dataset": "imagenet",
                          "method": "sort", "backbone": "resnet50", "head_dim": 2048, "top1": 0.7612345,
                          "top5": 0.93})
    write_tables(load_reference(str(reference)), select_runs(read_runs(runs_csv)), str(tmp_path / "t"))
    table = cells(tmp_path / "t" / "t.md")
    gap, sort = table[("GAP", "ResNet-50", "—")], table[("SORT", "ResNet-50", "—")]
    assert gap["Top-1 err."] == "24.70 / —"  # 24.7 beside 23.82: two decimals in the column
    assert sort["Top-1 err."] == "**23.82** / **23.88** (+0.06)"  # ours and Δ in the column's decimals
    assert gap["FP+BP (ms)"] == "21.30 / —"  # "1.80" in the CSV keeps its printed zero
    assert gap["Memory"] == "**0.505** / —" and sort["Memory"] == "1.100 / —"


# ---- the whole path: data in its official layout -> fit -> test -> the table cell ----------------------------
REPO = REPO_ROOT
SMALL = ["--trainer.max_epochs", "1", "--model.backbone_weights", "null", "--data.init_args.batch_size", "2"]
EXECUTION = ["--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
             "false"]


def _fit_and_test(config, tmp, name, extra=()):
    """fit + test through the CLI; returns the test's record in tmp/runs.csv."""
    where = ["--runs_csv", str(tmp / "runs.csv"), "--trainer.default_root_dir", str(tmp / name),
             "--checkpoint.dirpath", str(tmp / name / "ck")] + EXECUTION
    assert main(["fit", "--config", config] + list(extra) + where) == 0
    assert main(["test", "--config", config, "--ckpt_path", str(tmp / name / "ck" / "last.ckpt")]
                + list(extra) + where) == 0
    return read_runs(str(tmp / "runs.csv")).iloc[-1]


def test_fit_test_tables_on_the_three_benchmarks(tmp_path, capsys):
    """A recipe of each benchmark trained on its official layout fills its cell of the fine-grained table; a run
    that changed its recipe is marked with what it changed, and loses the cell to a run that follows its recipe."""
    from tests.replicas import write_aircraft, write_cars, write_cub

    cub = write_cub(str(tmp_path / "cub"), n_classes=3, per_class=4)
    aircraft = os.path.dirname(write_aircraft(str(tmp_path / "aircraft"), n_images=18, size=(40, 36)))
    cars, _, _ = write_cars(str(tmp_path / "cars"), n_train=6, n_test=6)
    sizes = ["--data.init_args.resize_size", "[36, 36]", "--data.init_args.crop_size", "32"]

    # CUB through a recipe of the user's own (not derived from a project recipe) that it follows: shown plainly.
    import yaml

    from finegrained.cli.recipe import load_recipe

    standalone = load_recipe(f"{REPO}/recipes/cub/isqrt_resnet50.yaml")
    standalone["trainer"]["max_epochs"] = 1
    standalone["model"]["backbone_weights"] = None
    standalone["data"]["init_args"].update(root=cub, resize_size=36, crop_size=32, batch_size=2)
    own = tmp_path / "cub_small.yaml"
    own.write_text(yaml.safe_dump(standalone))
    plain = _fit_and_test(str(own), tmp_path, "cub_plain")
    # A file that inherits from the project's recipe and shortens it is compared with the project's recipe: marked.
    derived = tmp_path / "cub_derived.yaml"
    derived.write_text(f"base: [{REPO}/recipes/cub/isqrt_resnet50.yaml]\ntrainer: {{max_epochs: 1}}\n"
                       f"model: {{backbone_weights: null}}\n"
                       f"data: {{init_args: {{root: {cub}, resize_size: [36, 36], crop_size: 32, batch_size: 2}}}}\n")
    modified = _fit_and_test(str(derived), tmp_path, "cub_modified")
    air = _fit_and_test(f"{REPO}/recipes/aircraft/isqrt_resnet50.yaml", tmp_path, "aircraft",
                        SMALL + sizes + ["--data.init_args.root", aircraft])
    car = _fit_and_test(f"{REPO}/recipes/cars/isqrt_resnet50.yaml", tmp_path, "cars",
                        SMALL + sizes + ["--data.init_args.root", cars])
    assert [r["dataset"] for r in (plain, modified, air, car)] == ["cub", "cub", "aircraft", "cars"]
    assert pd.isna(plain["overrides"]) or plain["overrides"] == ""
    expected = ("data.init_args.batch_size=2; data.init_args.crop_size=32; data.init_args.resize_size=[36, 36]; "
                "model.backbone_weights=null; trainer.max_epochs=1")
    assert air["overrides"] == car["overrides"] == expected  # paths, workers, device and logging do not count
    assert modified["overrides"] == expected

    capsys.readouterr()
    out = tmp_path / "tables"
    assert main(["tables", "--reference", REFERENCE, "--runs-csv", str(tmp_path / "runs.csv"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    row = cells(out / "finegrained.md")[("MPN-COV (iSQRT-COV)", "ResNet-50", "32K")]
    ours = lambda run: f"{100 * float(run['top1']):.1f}"  # noqa: E731
    assert split_cell(row["Birds"].replace("**", ""))[1] == float(ours(plain))  # the plain run, not the later one
    assert "‡" not in row["Birds"]
    assert re.fullmatch(rf"90\.0 / \**{ours(air)}\**‡1 \([+-]\d+\.\d\)", row["Aircraft"]), row["Aircraft"]
    assert re.fullmatch(rf"92\.8 / \**{ours(car)}\**‡1 \([+-]\d+\.\d\)", row["Cars"]), row["Cars"]
    assert f"‡1 A run that changed its recipe, not the paper's protocol: {expected}" in (out / "finegrained.md").read_text()
    assert "3 of the 4 recorded run(s) changed their recipe" in printed
    assert "ddagger" in (out / "finegrained.tex").read_text()

    assert main(["tables", "--reference", REFERENCE, "--runs-csv", str(tmp_path / "runs.csv"), "--out", str(out),
                 "--modified", "hide"]) == 0
    row = cells(out / "finegrained.md")[("MPN-COV (iSQRT-COV)", "ResNet-50", "32K")]
    assert split_cell(row["Aircraft"])[1] is None and split_cell(row["Cars"])[1] is None
    assert split_cell(row["Birds"].replace("**", ""))[1] == float(ours(plain))


def test_records_without_overrides_are_not_shown_as_following_their_recipe(tmp_path):
    path = tmp_path / "runs.csv"
    old_fields = [f for f in RUN_FIELDS if f != "overrides"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({"run_id": "old", "recipe": "r.yaml", "dataset": "CUB-200-2011", "method": "isqrt",
                         "backbone": "resnet50", "head_dim": 32896, "top1": 0.5, "timestamp": "2026-01-01"})
    runs = read_runs(str(path))
    assert runs.loc[0, "overrides"] == "not recorded"
    append_run(str(path), {"recipe": "r.yaml", "dataset": "cub", "method": "gap", "backbone": "vgg16", "top1": 0.1})
    runs = read_runs(str(path))
    assert list(runs["overrides"].fillna("")) == ["not recorded", ""]
    assert select_runs(runs, "all", modified="hide")["method"].tolist() == ["gap"]


def test_tables_name_a_missing_or_unreadable_runs_file(tmp_path, capsys):
    from finegrained.cli import entry_point

    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    for path, message in ((tmp_path / "typo.csv", "run records not found"),
                          (tmp_path / "binary.csv", "not a CSV of run records")):
        assert entry_point(["tables", "--reference", REFERENCE, "--runs-csv", str(path), "--out",
                            str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: {message}"), err


def test_older_run_records_gain_the_new_columns(tmp_path):
    from finegrained.results.runs import RUN_FIELDS, append_run, read_runs

    old = [f for f in RUN_FIELDS if f not in ("validation", "selection")]
    path = tmp_path / "runs.csv"
    path.write_text(",".join(old) + "\n" + ",".join("0.5" if f in ("top1", "top5", "mean_class_acc") else "x"
                                                     for f in old) + "\n")
    append_run(str(path), {"method": "isqrt", "validation": "held-out", "selection": "last epoch"})
    runs = read_runs(str(path))
    assert list(runs.columns) == RUN_FIELDS and len(runs) == 2
    assert runs["selection"].fillna("").tolist() == ["", "last epoch"]


def test_tables_help_names_every_published_table(capsys):
    with pytest.raises(SystemExit):
        main(["tables", "--help"])
    printed = capsys.readouterr().out
    with open(REFERENCE, newline="") as f:
        rows = list(csv.DictReader(f))
    counts = pd.Series([row["table"] for row in rows]).value_counts()
    for table, n in counts.items():
        assert f"  {table} ({n} numbers): " in printed
    for row in rows:  # every source in full
        assert row["source"] in printed, row["source"]
    assert "seed (" not in printed
