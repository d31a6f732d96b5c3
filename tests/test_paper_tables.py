"""The paper's tables (igsm/paper_tables.py): the layout of each, ours beside the published value
with the difference and its source, quoted rows, missing runs shown as missing (never a number), and
agreement of the spec with the default config and with the published FIDs used elsewhere."""

import re

import pandas as pd
import pytest
import yaml

from conftest import REPO
from igsm import paper_tables
from igsm.tables import COLUMNS

SPEC = paper_tables.load_spec()


def experiment_table(exp, models):
    """A per-experiment table (igsm/tables.py layout) with the given {model: {column: value}}."""
    rows = []
    for model, values in models.items():
        row = {c: None for c in COLUMNS}
        row.update({"experiment": exp, "model": model, "fid_mode": "clean", "fid_images": 50000, **values})
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def test_every_table_has_the_papers_rows_and_columns():
    assert paper_tables.table_names() == ["table1", "table2", "table3", "table4", "table5", "table8", "table9",
                                          "table10", "table11", "table12", "table13"]
    layout = {name: [(s.get("name", ""), [r["method"] for r in s["rows"]]) for s in t["sections"]]
              for name, t in SPEC["tables"].items()}
    assert layout["table1"] == [
        ("CIFAR-10 (32×32)", ["Dense", "Diff-Pruning", "Deep Cache", "O2MKD (N=4)", "IGSM"]),
        ("LSUN-Church (256×256)", ["Dense", "Diff-Pruning", "Deep Cache", "O2MKD (N=4)", "IGSM"]),
        ("LSUN-Bedroom (256×256)", ["Dense", "Diff-Pruning", "Deep Cache", "IGSM"])]
    assert [len(rows) for _, rows in layout["table2"]] == [5, 5]
    assert layout["table3"][0][1][0] == "NP" and len(layout["table3"][0][1]) == 4
    assert SPEC["tables"]["table8"]["columns"] == ["batch_size", "peak_memory_GiB", "sec_per_step",
                                                   "training_steps", "train_hours"]
    for name, table in SPEC["tables"].items():
        for section in table["sections"]:
            for row in section["rows"]:
                assert set(row["paper"]) | set(row.get("models", {})) <= set(table["columns"]), (name, row["method"])
                assert set(row.get("untranscribed", ())) <= set(table["columns"]) - set(row["paper"]), (name, row["method"])
                assert row.get("quoted") or "ours" in row, (name, row["method"])


def test_appendix_tables_have_the_papers_layout():
    """Tables 4, 11, 12, 13: the paper's rows, columns and (transcribed) published values."""
    tables = SPEC["tables"]
    rows = {name: {r["method"]: r for s in tables[name]["sections"] for r in s["rows"]}
            for name in ("table4", "table11", "table12", "table13")}
    assert tables["table4"]["columns"] == ["fid@0", "fid@1e-3", "fid@5e-3", "fid@1e-2", "fid@1e-1", "fid@1"]
    assert list(rows["table4"]) == ["PR 0.44", "PR 0.56", "PR 0.70"]
    # Only the two FIDs the prose states; every other cell is marked untranscribed, none left blank.
    assert [r["paper"] for r in rows["table4"].values()] == [{"fid@1e-1": 4.58}, {"fid@1e-2": 5.54}, {}]
    for row in rows["table4"].values():
        assert set(row["paper"]) | set(row["untranscribed"]) == set(tables["table4"]["columns"])
    assert tables["table11"]["columns"] == ["params_M", "macs_G", "speed", "fid@0", "fid@5e-4", "fid@1e-3",
                                            "fid@1e-2", "fid@5e-2", "fid@1e-1"]
    assert tables["table12"]["columns"] == ["params_M", "macs_G", "speed", "fid@0", "fid@1e-3", "fid@5e-3",
                                            "fid@1e-2", "fid@1e-1", "fid@5e-1"]
    for name in ("table11", "table12"):
        assert list(rows[name]) == ["PR 0 (dense)", "PR 0.5", "PR 0.7", "PR 0.8"]
        assert [r["paper"]["params_M"] for r in rows[name].values()] == [44.3, 22.7, 14.5, 10.4]
        assert [r["paper"]["speed"] for r in rows[name].values()] == [1.0, 1.4, 1.6, 1.7]
    assert [r["paper"]["fid@0"] for r in rows["table11"].values()] == [3.11, 3.53, 4.63, 6.68]
    assert rows["table11"]["PR 0.7"]["paper"]["fid@1e-2"] == 4.05  # the prose's
    assert rows["table11"]["PR 0.8"]["paper"] == {"params_M": 10.4, "macs_G": 2.6, "speed": 1.7, "fid@0": 6.68,
                                                  "fid@5e-4": 5.07, "fid@1e-3": 4.98, "fid@1e-2": 5.22}
    assert [r["paper"]["fid@0"] for r in rows["table12"].values()] == [2.87, 3.25, 3.57, 4.61]
    assert [rows["table12"]["PR 0.7"]["paper"][f"fid@{lam}"] for lam in ("1e-3", "5e-3", "1e-2", "1e-1", "5e-1")] == [
        3.32, 3.33, 3.30, 3.36, 3.46]
    # Cells whose column the text extraction leaves ambiguous say so on their row.
    for name, method in (("table11", "PR 0.5"), ("table11", "PR 0.7"), ("table12", "PR 0.5"), ("table12", "PR 0.8")):
        assert "ambiguous" in rows[name][method]["note"], (name, method)
    assert tables["table13"]["columns"] == ["fid"]
    assert list(rows["table13"]) == [f"Δt {dt}, step {step}, Prob {prob}" for dt in ("0.01", "0.1")
                                     for step in (1, 2) for prob in ("0.2", "0.5", "1.0")] + ["no OTD (IGSM)"]
    assert [r["paper"]["fid"] for r in rows["table13"].values()] == [
        4.66, 4.62, 4.71, 4.63, 4.63, 4.66, 4.64, 4.62, 4.67, 4.63, 4.62, 4.67, 4.58]
    assert rows["table13"]["no OTD (IGSM)"]["ours"]["model"] == "diff-pruning-cr0.3/igsm"


def test_otd_rows_name_objectives_with_their_settings():
    """Table 13's row "Δt d, step s, Prob p" is an IGSM objective (λ_Jac 0.1) with otd {d, s, p}."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for row in SPEC["tables"]["table13"]["sections"][0]["rows"][:-1]:
        dt, step, prob = (float(part.split()[-1]) for part in row["method"].split(", "))
        objective = config["objectives"][row["ours"]["model"].split("/")[1]]
        assert objective == {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}, "directions": "otd",
                             "otd": {"dt": dt, "steps": step, "prob": prob}}, row["method"]


def test_cells_hold_ours_the_paper_and_the_difference():
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        "dense": {"params_M": 35.746, "macs_G": 6.064, "fid": 4.31, "speed": 1.0, "training_steps": 0},
        "diff-pruning-cr0.3/np": {"params_M": 19.85, "macs_G": 3.39, "fid": 5.5, "speed": 1.3,
                                  "training_steps": 100000},
    })}
    cells = paper_tables.build("table1", tables).set_index(["section", "method", "column"])
    dense_fid = cells.loc[("CIFAR-10 (32×32)", "Dense", "fid")]
    assert (dense_fid.status, dense_fid.ours, dense_fid.paper) == ("ours", 4.31, 4.19)
    assert dense_fid.delta == pytest.approx(4.31 - 4.19)
    assert dense_fid.source == "cifar10_unet/dense, FID clean, 50000 images"
    dp = cells.loc[("CIFAR-10 (32×32)", "Diff-Pruning", "params_M")]
    assert (dp.ours, dp.paper, dp.source) == (19.85, 19.8, "cifar10_unet/diff-pruning-cr0.3/np")
    # A model of a present experiment that was not scored, an experiment the config lacks, a
    # method the workflow does not run: never a number of ours.
    igsm = cells.loc[("CIFAR-10 (32×32)", "IGSM", "fid")]
    assert (igsm.status, igsm.paper) == ("missing", 4.58) and pd.isna(igsm.ours)
    assert "scores no model diff-pruning-cr0.3/igsm" in igsm.source
    church = cells.loc[("LSUN-Church (256×256)", "Dense", "fid")]
    assert church.status == "missing" and pd.isna(church.ours) and "church_unet is not in the config" in church.source
    cache = cells.loc[("CIFAR-10 (32×32)", "Deep Cache", "fid")]
    assert (cache.status, cache.paper) == ("quoted", 4.70) and pd.isna(cache.ours)
    # A present model without the value (no GPU: no speed) is missing, not zero.
    no_speed = paper_tables.build("table1", {"cifar10_unet": experiment_table(
        "cifar10_unet", {"dense": {"fid": 4.3, "params_M": 35.7, "macs_G": 6.1}})})
    speed = no_speed.set_index(["section", "method", "column"]).loc[("CIFAR-10 (32×32)", "Dense", "speed")]
    assert speed.status == "missing" and pd.isna(speed.ours) and "no value recorded" in speed.source


def test_training_cost_comes_from_the_summaries_columns():
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        "diff-pruning-cr0.3/igsm": {"batch_size": 128, "peak_memory_GiB": 14.5, "sec_per_step": 0.58,
                                    "training_steps": 100000, "train_minutes": 990.0}})}
    cells = paper_tables.build("table8", tables).set_index(["section", "method", "column"])
    hours = cells.loc[("CIFAR-10 (PR 0.44)", "IGSM", "train_hours")]
    assert (hours.ours, hours.paper) == (16.5, 18.1)
    assert cells.loc[("CIFAR-10 (PR 0.44)", "IGSM", "batch_size")].ours == 128


def test_lambda_sweep_cells_read_each_lambdas_model():
    """Table 10: a column per λ_Jac, each cell the FID of the row's ratio finetuned with that λ;
    λ 0 is Diff-Pruning's NP finetune; a λ the paper did not run at that ratio is blank."""
    fids = {"np": 5.3, "igsm_lam1e-2": 4.7, "igsm": 4.6, "igsm_lam1": 4.9}
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        f"diff-pruning-cr0.3/{o}": {"fid": f} for o, f in fids.items()})}
    cells = paper_tables.build("table10", tables).set_index(["method", "column"])
    row = {c: cells.loc[("PR 0.44", c)] for c in ("fid@0", "fid@1e-4", "fid@1e-2", "fid@1e-1", "fid@1")}
    assert [row[c].ours for c in ("fid@0", "fid@1e-2", "fid@1e-1", "fid@1")] == [5.3, 4.7, 4.6, 4.9]
    assert row["fid@1e-1"].source.startswith("cifar10_unet/diff-pruning-cr0.3/igsm, FID")
    assert row["fid@1e-4"].status == "none" and pd.isna(row["fid@1e-4"].ours)
    assert cells.loc[("PR 0.56", "fid@1e-3")].status == "missing"  # that ratio was not scored here
    assert paper_tables.heading_of("fid@1e-2") == "FID λ=1e-2"


def test_untranscribed_cells_show_ours_and_never_a_paper_number(tmp_path):
    """Table 4: a cell the paper's text extraction does not let us read shows ours beside "n.t.",
    never a number of the paper's (nor "–", which would say the paper has none)."""
    fids = {"np": 5.3, "igsm_lam1e-2": 4.7, "igsm": 4.6, "igsm_lam1": 4.9}
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        f"diff-pruning-cr0.3/{o}": {"fid": f} for o, f in fids.items()})}
    cells = paper_tables.build("table4", tables)
    untranscribed = cells[cells.status == "untranscribed"]
    assert len(untranscribed) == 18 - 2 and untranscribed.paper.isna().all() and untranscribed.delta.isna().all()
    assert (cells.status != "none").all()
    by_cell = cells.set_index(["method", "column"])
    stated = by_cell.loc[("PR 0.44", "fid@1e-1")]
    assert (stated.status, stated.ours, stated.paper) == ("ours", 4.6, 4.58)
    assert by_cell.loc[("PR 0.56", "fid@1e-2")].paper == 5.54
    one = by_cell.loc[("PR 0.44", "fid@1")]
    assert one.ours == 4.9 and one.source.startswith("cifar10_unet/diff-pruning-cr0.3/igsm_lam1, FID")
    assert one.source.endswith("the paper's value not transcribed")
    assert by_cell.loc[("PR 0.44", "fid@5e-3")].source == "not run here; the paper's value not transcribed"
    assert pd.isna(by_cell.loc[("PR 0.44", "fid@5e-3")].ours)
    markdown = tmp_path / "t4.md"
    paper_tables.write("table4", cells, markdown)
    text = markdown.read_text()
    assert '"n.t.": the paper\'s value not transcribed' in text
    line = next(line for line in text.splitlines() if line.startswith("| PR 0.44"))
    assert re.findall(r"/ ([^|(]+?)\s*(?:\(|\|)", line) == ["n.t."] * 4 + ["4.58"] + ["n.t."], line
    assert "5.30 / n.t." in line and "4.60 / 4.58 (+0.02)" in line and "– / n.t." in line  # 5e-3: not run
    line = next(line for line in text.splitlines() if line.startswith("| PR 0.56"))
    assert "missing / 5.54" in line and "missing / n.t." in line  # models of the config, not scored here
    # No experiment at all: still no paper number in an untranscribed cell.
    empty = paper_tables.build("table4", {})
    assert empty[empty.status == "untranscribed"].paper.isna().all()
    assert set(empty.status) == {"untranscribed", "missing"}


def test_rows_that_ran_otherwise_than_the_paper_are_marked(tmp_path):
    """A quick look (`scale`): fewer finetune steps and FID images than the paper's are marked
    on the row, in the CSV and the Markdown; the dense teacher's steps are not (it is pretrained)."""
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        "dense": {"fid": 4.5, "fid_images": 5000, "training_steps": 0},
        "diff-pruning-cr0.3/np": {"fid": 6.0, "fid_images": 5000, "training_steps": 1000},
        "diff-pruning-cr0.3/igsm": {"fid": 5.0, "fid_images": 50000, "training_steps": 100000}})}
    cells = paper_tables.build("table5", tables).set_index(["section", "method", "column"])
    assert cells.loc[("U-Net", "DP, PR 0.44", "fid")].differs == (
        "diff-pruning-cr0.3/np: 1,000 finetune steps (paper 100k); "
        "diff-pruning-cr0.3/np: FID on 5,000 images (paper 50k)")
    assert cells.loc[("U-Net", "dense", "fid")].differs == "dense: FID on 5,000 images (paper 50k)"
    assert cells.loc[("U-Net", "IGSM, PR 0.44", "fid")].differs == ""
    markdown = tmp_path / "t5.md"
    paper_tables.write("table5", paper_tables.build("table5", tables), markdown)
    assert "† ours differ: diff-pruning-cr0.3/np: 1,000 finetune steps (paper 100k)" in markdown.read_text()


def test_written_files(tmp_path):
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        f"diff-pruning-cr0.3/{o}": {"fid": f} for o, f in (("np", 5.4), ("np_kd", 5.1), ("igsm", 4.6))})}
    cells = paper_tables.build("table3", tables)
    paths = {kind: tmp_path / f"table3.{kind}" for kind in ("md", "csv", "tex")}
    paper_tables.write("table3", cells, paths["md"], paths["csv"], paths["tex"])
    markdown = paths["md"].read_text()
    assert "## Table 3" in markdown
    assert re.search(r"\| NP \+ KD \+ FTLE JM \(IGSM\)\s*\| 4\.60 / 4\.58 \(\+0\.02\)", markdown), markdown
    assert re.search(r"\| NP \+ KD \+ 1st-order JM\s*\| missing / 5\.14", markdown), markdown
    back = pd.read_csv(paths["csv"])
    assert list(back.columns) == paper_tables.LONG_COLUMNS and len(back) == 4
    latex = paths["tex"].read_text()
    assert "\\toprule" in latex and "\\caption{Table 3" in latex


def test_spec_agrees_with_the_default_config_and_the_published_fids():
    """Every model a table names is a scored model of the default config (so all_tables fills it),
    and every published FID equals the one igsm/paper_results.csv gives the per-experiment tables."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    scored = {}
    for exp, settings in config["experiments"].items():
        criterion = settings.get("prune", {}).get("criterion", "diff-pruning")
        scored[exp] = {"dense"} | {f"{run.get('criterion', criterion)}-cr{run['channel_ratio']}/{o}"
                                   for run in settings["finetune"]["runs"] for o in run["objectives"]}
    for name, table in SPEC["tables"].items():
        for section in table["sections"]:
            for row in section["rows"]:
                if "ours" in row:
                    exp = row["ours"]["experiment"]
                    for model in (row["ours"]["model"], *row.get("models", {}).values()):
                        assert model in scored.get(exp, ()), (name, row["method"], exp, model)
    published = pd.read_csv(REPO / "igsm" / "paper_results.csv", dtype=str, keep_default_na=False)
    fids = {}
    for _, r in published.iterrows():
        fids.setdefault((r.dense_model, r.pr_label), set()).add(float(r.fid))
    t1 = SPEC["tables"]["table1"]["sections"]
    for section, dense_model in zip(t1, ("google/ddpm-cifar10-32", "google/ddpm-church-256", "google/ddpm-bedroom-256")):
        for row in section["rows"]:
            if row.get("quoted"):
                continue
            label = "dense" if row["method"] == "Dense" else ("0.44" if "cifar10" in dense_model else "0.30")
            assert row["paper"]["fid"] in fids[(dense_model, label)], (dense_model, row["method"])


def test_figures_from_the_tables(tmp_path):
    """FID vs pruning ratio (Table 5) and vs λ_Jac (Table 10), PNG and PDF, with or without ours."""
    from igsm import plots

    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        "diff-pruning-cr0.3/np": {"fid": 5.3}, "diff-pruning-cr0.3/igsm": {"fid": 4.6}})}
    for figure, (table, function) in paper_tables.FIGURES.items():
        for name, source in (("ours", tables), ("paper-only", {})):
            paths = [tmp_path / f"{figure}-{name}.png", tmp_path / f"{figure}-{name}.pdf"]
            getattr(plots, function)(paper_tables.build(table, source), paths)
            assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"


def test_sample_comparison_figure(tmp_path):
    """Dense, Diff-Pruning and IGSM grids side by side, a row per dataset the config has."""
    import numpy as np
    from PIL import Image

    from igsm import plots

    grids = paper_tables.sample_grids("samples_unet", {"cifar10_unet", "church_unet"})
    assert grids == {
        "CIFAR-10 (32×32)": {"dense": "results/samples/cifar10_unet/dense/grid.png",
                             "Diff-Pruning": "results/samples/cifar10_unet/diff-pruning-cr0.3/np/grid.png",
                             "IGSM": "results/samples/cifar10_unet/diff-pruning-cr0.3/igsm/grid.png"},
        "LSUN-Church (256×256)": {"dense": "results/samples/church_unet/dense/grid.png",
                                  "Diff-Pruning": "results/samples/church_unet/diff-pruning-cr0.3/np/grid.png",
                                  "IGSM": "results/samples/church_unet/diff-pruning-cr0.3/igsm_lam1e-2/grid.png"}}
    assert paper_tables.sample_grids("samples_uvit", {"cifar10_unet"}) == {}
    files = {}
    for k, column in enumerate(("dense", "Diff-Pruning", "IGSM")):
        files[column] = tmp_path / f"{k}.png"
        Image.fromarray(np.full((20, 20, 3), 80 * k, np.uint8)).save(files[column])
    paths = [tmp_path / "samples.png", tmp_path / "samples.pdf"]
    plots.plot_sample_comparison({"CIFAR-10": files}, paths)
    with Image.open(paths[0]) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 0 and paths[1].read_bytes()[:5] == b"%PDF-"


def test_default_config_builds_every_paper_table(tmp_path):
    from conftest import run_snakemake

    proc = run_snakemake("-n", "all_tables", "--configfile", str(REPO / "config" / "config.yaml"),
                         "-d", str(tmp_path), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for name in paper_tables.table_names():
        assert f"results/paper_tables/{name}.md" in proc.stdout, name
    for figure in (*paper_tables.FIGURES, *paper_tables.SAMPLE_FIGURES):
        assert f"results/paper_figures/{figure}.pdf" in proc.stdout, figure
