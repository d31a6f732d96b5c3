"""igsm.tables on hand-made result files for experiments the paper reports (issue 19): the paper's
column holds the paper's number, ours holds ours, the difference is ours − paper's, and rows the
paper does not have get no paper value."""

import json

import pandas as pd
import pytest

from igsm import tables
from igsm.paper import tables as paper_tables

DENSE = "google/ddpm-cifar10-32"
IGSM = {"np": 1.0, "kd": 1.0, "jm2": 0.1}   # paper Table 1, PR 0.44: FID 4.58
NP = {"np": 1.0}                            # Diff-Pruning, PR 0.44: 5.29
OTD = {"weights": IGSM, "directions": "otd", "otd": {"dt": 0.01, "steps": 2, "prob": 0.5}}  # Table 13: 4.63
SPEC = paper_tables.load_spec()
OBJECTIVES = {"igsm": {"weights": IGSM}, "np": {"weights": NP}, "otd": OTD}  # the config's, as the rule passes them


def paper_fid(method, section="CIFAR-10 (32×32)"):
    """A published FID of Table 1, read from igsm/paper/tables.yaml here (not through igsm.tables'
    matching)."""
    rows = next(s["rows"] for s in SPEC["tables"]["table1"]["sections"] if s["name"] == section)
    return next(r["paper"]["fid"] for r in rows if r["method"] == method)


def ablation_fid(criterion):
    """Diff-Pruning's own ablation (other_published)."""
    return next(e["fid"] for e in SPEC["other_published"] if e["criterion"] == criterion)


def write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return str(path)


def results(tmp_path, variant, fid, params, macs, label=None, steps=None, criterion="", ratio=None,
            objective=None, kind=None):
    """The files the workflow writes for one scored model (rules/common.smk table_rows): what it
    is (results/variants/…json, from the config) and its numbers."""
    base = tmp_path / variant.replace("/", "__")
    finetuned = objective is not None
    meta = {"variant": variant, "kind": kind or ("finetuned" if finetuned else variant), "criterion": criterion,
            "channel_ratio": ratio, "objective": objective or variant,
            "weights": OBJECTIVES[objective]["weights"] if finetuned else None,
            "pruned": variant.split("/")[0] if finetuned else None}
    entry = {
        "metadata": write(base / "variant.json", meta),
        "fid": write(base / "fid.json", {"fid": fid, "num_images": 50000, "mode": "clean",
                                        "samples": "s.npz", "num_reference": 50000}),
        "efficiency": write(base / "eff.json", {"params": params, "macs": macs, "images_per_s": None}),
        "summary": None, "prune_report": None,
    }
    if finetuned:
        entry.update(summary=write(base / "summary.json", {"num_steps": steps, "timing": {
                         "wall_time_s": 600.0, "sec_per_step": 0.1, "peak_memory_mib": 2048.0}}),
                     prune_report=write(base / "report.json", {"paper_label": label, "criterion": criterion}))
    return entry


@pytest.fixture
def table(tmp_path):
    rows = [results(tmp_path, "dense", 4.35, 35.746e6, 6.064e9),
            results(tmp_path, "diff-pruning-cr0.3/igsm", 4.50, 19.85e6, 3.39e9, "0.44", 100000,
                    "diff-pruning", 0.3, "igsm"),
            results(tmp_path, "diff-pruning-cr0.3/np", 5.61, 19.85e6, 3.39e9, "0.44", 100000,
                    "diff-pruning", 0.3, "np"),
            results(tmp_path, "magnitude-cr0.3/np", 5.40, 19.85e6, 3.39e9, "0.44", 100000, "magnitude", 0.3, "np"),
            results(tmp_path, "diff-pruning-cr0.45/np", 7.00, 12e6, 2.2e9, "0.64", 100000,
                    "diff-pruning", 0.45, "np"),
            results(tmp_path, "diff-pruning-cr0.4/np", 6.00, 14.32e6, 2.74e9, "0.56", 100000,
                    "diff-pruning", 0.4, "np"),
            results(tmp_path, "diff-pruning-cr0.3/otd", 4.70, 19.85e6, 3.39e9, "0.44", 100000,
                    "diff-pruning", 0.3, "otd"),
            results(tmp_path, "diff-pruning-cr0.3/igsm/reuse-cache-f0.5", 4.80, 19.85e6, 3.39e9, "0.44", 100000,
                    "diff-pruning", 0.3, "igsm", kind="reuse")]
    return tables.build_rows("cifar10_unet", "cifar10", DENSE, rows, OBJECTIVES).set_index("model")


def test_paper_column_holds_the_papers_number_and_ours_holds_ours(table):
    """Catches the paper's column filled with our value (or ours with the paper's), a paper value
    looked up for the wrong experiment (criterion, objective weights or PR label ignored), and a difference
    taken the other way round (paper − ours) or unsigned. The hand-made FIDs put ours below the
    paper's for one row and above for another, so both signs are exercised."""
    expected = {"dense": (4.35, paper_fid("Dense")),
                "diff-pruning-cr0.3/igsm": (4.50, paper_fid("IGSM")),
                "diff-pruning-cr0.3/np": (5.61, paper_fid("Diff-Pruning")),
                "magnitude-cr0.3/np": (5.40, ablation_fid("magnitude"))}
    assert [p for _, p in expected.values()] == [4.19, 4.58, 5.29, 5.48]  # the spec's published numbers
    for model, (ours, paper) in expected.items():
        row = table.loc[model]
        assert row.fid == ours and row.paper_fid == paper, model
        assert row.delta_fid == pytest.approx(ours - paper, abs=1e-12), model
    assert table.loc["diff-pruning-cr0.3/igsm", "delta_fid"] < 0 < table.loc["diff-pruning-cr0.3/np", "delta_fid"]


def test_paper_source_names_the_papers_table(table):
    """Catches the source column holding anything but the table and row the value is from (it held
    a bound method's repr while the code read ``row.where``, which is pandas' ``Series.where``), and
    a value two tables print differently shown without the other."""
    assert table.loc["dense", "paper_source"] == "IGSM Table 1 (Dense)"
    assert table.loc["diff-pruning-cr0.3/igsm", "paper_source"] == "IGSM Table 1 (IGSM)"
    assert table.loc["diff-pruning-cr0.3/np", "paper_source"] == "IGSM Table 1 (Diff-Pruning)"
    assert table.loc["magnitude-cr0.3/np", "paper_source"] == "Diff-Pruning ablation"
    row = table.loc["diff-pruning-cr0.4/np"]
    assert (row.paper_fid, row.paper_source) == (6.36, "IGSM Table 5 (DP, PR 0.56; Table 10: 6.49)")


def test_objective_settings_beyond_the_weights_pick_the_papers_row(table):
    """Catches matching on the weights alone: an OTD run (IGSM's weights, OTD directions) is Table
    13's row with its Δt, step and Prob, not IGSM's 4.58; a block-reuse variant of the IGSM model
    samples otherwise than the paper and gets no paper value."""
    otd = table.loc["diff-pruning-cr0.3/otd"]
    assert (otd.paper_fid, otd.paper_source) == (4.63, "IGSM Table 13 (Δt 0.01, step 2, Prob 0.5)")
    reuse = table.loc["diff-pruning-cr0.3/igsm/reuse-cache-f0.5"]
    assert pd.isna(reuse.paper_fid) and reuse.paper_source == ""


def test_rows_the_paper_lacks_have_no_paper_value(table):
    """Catches a lookup that falls back to any row of the dense model (PR label 0.64 is not in
    the paper)."""
    row = table.loc["diff-pruning-cr0.45/np"]
    assert pd.isna(row.paper_fid) and pd.isna(row.delta_fid) and row.paper_source == ""


def test_other_columns_come_from_their_files(table):
    """Catches params/MACs unit slips and training cost read from the wrong keys."""
    row = table.loc["diff-pruning-cr0.3/igsm"]
    assert (row.params_M, row.macs_G) == pytest.approx((19.85, 3.39))
    assert (row.pr_label, row.criterion, row.channel_ratio, row.objective) == ("0.44", "diff-pruning", 0.3, "igsm")
    assert row.training_steps == 100000 and row.fid_images == 50000 and row.fid_mode == "clean"
    assert (row.train_minutes, row.peak_memory_GiB, row.sec_per_step) == pytest.approx((10.0, 2.0, 0.1))


def test_written_tables_put_each_number_in_its_column(table, tmp_path):
    """Catches the Markdown/CSV writer swapping or renaming the FID, paper FID and Δ columns."""
    md, csv = tmp_path / "t.md", tmp_path / "t.csv"
    tables.write_tables(table.reset_index(), markdown=md, csv=csv)
    back = pd.read_csv(csv).set_index("model")
    assert back.loc["diff-pruning-cr0.3/igsm", ["fid", "paper_fid"]].tolist() == [4.50, 4.58]
    lines = md.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = next([c.strip() for c in line.strip("|").split("|")] for line in lines
                 if "diff-pruning-cr0.3/igsm" in line)
    row = dict(zip(header, cells))
    assert (row["FID"], row["paper FID"], row["Δ FID"]) == ("4.50", "4.58", "-0.08")


def test_combined_summary_shows_the_main_columns_that_have_values(table, tmp_path):
    """results/tables/all.md (what `make demo` prints): the experiment, the model and the columns
    compared across experiments, those without any value left out; the CSV keeps every column
    (catches the summary dropping the experiment, keeping the 20-odd training columns, or losing a
    column in the CSV)."""
    md, csv = tmp_path / "all.md", tmp_path / "all.csv"
    tables.write_tables(table.reset_index(), markdown=md, csv=csv, title="All experiments", summary=True)
    lines = md.read_text().splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("|")).strip("|").split("|")]
    assert header[:2] == ["experiment", "model"] and "FID" in header and "paper FID" in header
    assert set(header) <= set(tables.SUMMARY_COLUMNS)
    assert not {"steps", "batch", "s/step", "train min", "paper source", "CLIP", "SSIM to dense"} & set(header)
    assert "all.csv" in md.read_text()
    assert list(pd.read_csv(csv).columns) == list(table.reset_index().columns)
