"""The paper's tables (igsm/paper/tables.py): the layout of each, every published value checked
against the paper's text, ours beside the published value with the difference and its source,
quoted rows, missing runs shown as missing (never a number), the paper's disagreements with itself
shown on both cells, and agreement of the spec with the default config."""

import math
import re

import pandas as pd
import pytest
import yaml

from conftest import REPO, SHARED, skip_or_fail_in_ci
from igsm.paper import tables as paper_tables
from igsm.tables import COLUMNS

SPEC = paper_tables.load_spec()


def experiment_table(exp, models):
    """A per-experiment table (igsm/tables.py layout) with the given {model: {column: value}}; the
    model's columns (criterion, channel ratio, objective) as its name gives them."""
    rows = []
    for model, values in models.items():
        row = {c: None for c in COLUMNS}
        pruned, objective = model.split("/")[:2] if "/" in model else ("", model)
        criterion, ratio = pruned.rsplit("-cr", 1) if pruned else ("", None)
        row.update({"experiment": exp, "model": model, "criterion": criterion,
                    "channel_ratio": float(ratio) if ratio else None, "objective": objective,
                    "fid_mode": "clean", "fid_images": 50000, **values})
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def test_every_table_has_the_papers_rows_and_columns():
    assert paper_tables.table_names() == ["table1", "table2", "table3", "table4", "table5", "table8", "table9",
                                          "table10", "table11", "table12", "table13"]
    layout = {name: [(s.get("name", ""), [r["method"] for r in s["rows"]]) for s in t["sections"]]
              for name, t in SPEC["tables"].items()}
    # Rows per section, as the paper prints them (Table 5: a DP and an IGSM row per PR).
    assert {name: [len(rows) for _, rows in sections] for name, sections in layout.items()} == {
        "table1": [5, 5, 4], "table2": [5, 5], "table3": [4], "table4": [3], "table5": [9, 9],
        "table8": [2, 2], "table9": [2, 2], "table10": [5], "table11": [4], "table12": [4], "table13": [13]}
    assert layout["table5"] == [
        ("U-Net", ["dense"] + [f"{m}, PR {pr}" for pr in ("0.44", "0.56", "0.70", "0.82") for m in ("DP", "IGSM")]),
        ("U-ViT", ["dense"] + [f"{m}, PR {pr}" for pr in ("0.5", "0.6", "0.7", "0.8") for m in ("DP", "IGSM")])]
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
                # The paper's PR label of every row we run (0: the dense model): pruning labels and
                # the per-experiment tables' paper column depend on it.
                assert row.get("quoted") or row.get("pr") is not None, (name, row["method"])
                assert set(row.get("disagrees", {})) <= set(row["paper"]), (name, row["method"])


def test_appendix_tables_have_the_papers_layout():
    """Tables 4, 11, 12, 13: the paper's rows, columns and (transcribed) published values."""
    tables = SPEC["tables"]
    rows = {name: {r["method"]: r for s in tables[name]["sections"] for r in s["rows"]}
            for name in ("table4", "table11", "table12", "table13")}
    assert tables["table4"]["columns"] == ["fid@0", "fid@1e-3", "fid@5e-3", "fid@1e-2", "fid@1e-1", "fid@1"]
    assert list(rows["table4"]) == ["PR 0.44", "PR 0.56", "PR 0.70"]
    # λ 0, 1e-2, 1e-1 and 1: the FIDs whose row the text fixes; 1e-3 and 5e-3 (one 7.10 each, row
    # unknown) untranscribed; a cell the paper leaves blank is neither.
    assert [r["paper"] for r in rows["table4"].values()] == [
        {"fid@0": 5.01, "fid@1e-2": 4.75, "fid@1e-1": 4.58, "fid@1": 4.93},
        {"fid@0": 5.90, "fid@1e-2": 5.54, "fid@1e-1": 5.66}, {"fid@0": 7.27, "fid@1e-2": 7.16}]
    for row in rows["table4"].values():
        assert row["untranscribed"] == ["fid@1e-3", "fid@5e-3"]
        assert row["ours"]["objective"] == "np_kd", row["method"]  # λ_Jac = 0 of IGSM's loss: NP + KD
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
    # The merged PR 0.7 / 0.8 line: 5.01 and 6.04 are PR 0.7's (the spec's comment says why).
    assert {k: rows["table11"]["PR 0.7"]["paper"][k] for k in ("fid@5e-2", "fid@1e-1")} == {
        "fid@5e-2": 5.01, "fid@1e-1": 6.04}
    assert [r["paper"]["fid@0"] for r in rows["table12"].values()] == [2.87, 3.25, 3.57, 4.61]
    assert [rows["table12"]["PR 0.7"]["paper"][f"fid@{lam}"] for lam in ("1e-3", "5e-3", "1e-2", "1e-1", "5e-1")] == [
        3.32, 3.33, 3.30, 3.36, 3.46]
    # Cells whose column the text extraction leaves ambiguous say so on their row.
    for name, method in (("table11", "PR 0.5"), ("table11", "PR 0.7"), ("table12", "PR 0.5"), ("table12", "PR 0.8")):
        assert "ambiguous" in rows[name][method]["note"], (name, method)
    assert "merged" in rows["table11"]["PR 0.8"]["note"]
    assert tables["table13"]["columns"] == ["fid"]
    assert list(rows["table13"]) == [f"Δt {dt}, step {step}, Prob {prob}" for dt in ("0.01", "0.1")
                                     for step in (1, 2) for prob in ("0.2", "0.5", "1.0")] + ["no OTD (IGSM)"]
    assert [r["paper"]["fid"] for r in rows["table13"].values()] == [
        4.66, 4.62, 4.71, 4.63, 4.63, 4.66, 4.64, 4.62, 4.67, 4.63, 4.62, 4.67, 4.58]
    assert rows["table13"]["no OTD (IGSM)"]["ours"] == {"experiment": "cifar10_unet", "criterion": "diff-pruning",
                                                       "channel_ratio": 0.3, "objective": "igsm"}


# Where each table's numbers stand in the paper's text extraction: (first line containing, first
# later line containing — not included). Table 3's and 4's numbers are interleaved; the last row of
# each backbone of Table 5 stands after Table 3's and Table 5's captions, one number a line.
TEXT_BLOCKS = {
    "table1": [("CIFAR-10 (32 × 32)\t", "Table 1: Quantitative")],
    "table2": [("Table 2: Quantitative", "O2MKD (11.74) while")],
    "table3": [("NP\tKD\t1st-order JM", "Table 4: Analysis")],
    "table4": [("NP\tKD\t1st-order JM", "Table 4: Analysis")],
    "table5": [("\t\tU-Net\t", "model capacity is significantly"),
               ("5.4 Ablation Study", "We conduct a comprehensive ablation")],
    "table8": [("Dataset\tMethod\tBatch\tMemory\tTime per Iter", "Table 8: Training details")],
    "table9": [("Table 9: Training details", "Transformer-based models (Table 9)")],
    "table10": [("Table 10: Jacobian matching", "D.2 U-ViT")],
    "table11": [("CIFAR-10 32 $ imes$ 32", "Table 11: Jacobian")],
    "table12": [("Table 12: Jacobian", "E Further Potential")],
    "table13": [("Table 13: FID scores", "In practice, we use a single")],
}


def printed_numbers(text):
    """The numbers a piece of the paper's text prints, "800k" and "4.4 M" also as 800000 and
    4400000; a number split around its decimal point by the extraction (Table 5's "4\t.19") joined."""
    numbers = []
    for digits, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([kKM]?)", re.sub(r"(\d)\s+\.(\d)", r"\1.\2", text)):
        numbers.append(float(digits))
        if suffix:
            numbers.append(float(digits) * (1e6 if suffix == "M" else 1e3))
    return numbers


def text_block(lines, start, stop):
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i in range(first + 1, len(lines)) if stop in lines[i])
    return "\n".join(lines[first:last])


def test_every_published_value_stands_in_its_tables_text():
    """Each number of the spec is printed in the paper's text where that table stands (catches a
    mistyped value, one taken from the wrong table, or an invented one), and the numbers quoted from
    Diff-Pruning's ablation are NOTES.md's."""
    paper = SHARED / "reference" / "igsm-paper.txt"
    if not paper.exists():
        skip_or_fail_in_ci(f"{paper} not present (../shared beside the checkout)")
    lines = paper.read_text().splitlines()
    assert set(TEXT_BLOCKS) == set(SPEC["tables"])
    checked = 0
    for name, table in SPEC["tables"].items():
        printed = printed_numbers("\n".join(text_block(lines, *block) for block in TEXT_BLOCKS[name]))
        for section in table["sections"]:
            for row in section["rows"]:
                for column, value in row["paper"].items():
                    found = any(math.isclose(value, n, rel_tol=1e-9) for n in printed)
                    assert found, (name, row["method"], column, value)
                    checked += 1
    assert checked == 310  # every cell of the spec: the loop above skipped none
    notes = (SHARED / "reference" / "NOTES.md").read_text()
    ablation = re.search(r"taylor/magnitude/random → ([\d.]+)/([\d.]+)/([\d.]+)", notes).groups()
    scratch = re.search(r"scratch training 100k/500k/800k → ([\d.]+)/", notes).group(1)
    published = {e["criterion"]: e["fid"] for e in SPEC["other_published"]}
    assert published == {"taylor": float(ablation[0]), "magnitude": float(ablation[1]),
                         "random": float(ablation[2]), "reinit": float(scratch)}


def test_the_papers_disagreements_show_both_values(tmp_path):
    """Where two tables print different values for the same model and measure, both cells show the
    other table's (catches a link shown on one side only, or one between equal values: a slip)."""
    links = paper_tables._disagreements()
    for name, table in SPEC["tables"].items():
        for section in table["sections"]:
            for row in section["rows"]:
                for column, ref in row.get("disagrees", {}).items():
                    _, other = paper_tables._find_row(ref)
                    assert other["paper"][ref["column"]] != row["paper"][column], (name, row["method"], column)
                    there = (ref["table"], ref.get("section", ""), ref["row"], ref["column"])
                    assert f"{paper_tables.table_label(name)}: {row['paper'][column]:.2f}" in links[there]
    cells = paper_tables.build("table5", {}).set_index(["section", "method", "column"])
    assert cells.loc[("U-Net", "DP, PR 0.56", "fid")].paper_other == "Table 10: 6.49"
    assert cells.loc[("U-ViT", "IGSM, PR 0.8", "fid")].paper_other == "Table 11: 5.22"
    assert cells.loc[("U-Net", "IGSM, PR 0.82", "fid")].paper_other == ""  # Table 10 prints the same 10.91
    back = paper_tables.build("table10", {}).set_index(["method", "column"])
    assert back.loc[("PR 0.56", "fid@0")].paper_other == "Table 5: 6.36"
    markdown = tmp_path / "t5.md"
    paper_tables.write("table5", paper_tables.build("table5", {}), markdown)
    text = markdown.read_text()
    assert "missing / 6.36 [Table 10: 6.49]" in text and "Table N prints x for the same model" in text


def test_pruning_labels_are_the_points_the_tables_print():
    """The paper's PR labels (igsm/pruning/structural.py) come from the tables' counts: each dense model's
    pruned points, and nothing else (catches a dense row without `pr: 0`, a point dropped, or a
    label read from the wrong column)."""
    points = {(dense, pr, pruned) for dense, pr, pruned in paper_tables.pruning_points()}
    assert points == {
        ((35.7, 6.1), 0.44, (19.8, 3.4)), ((35.7, 6.1), 0.56, (14.3, 2.7)), ((35.7, 6.1), 0.70, (8.6, 1.5)),
        ((35.7, 6.1), 0.70, (8.7, 1.5)), ((35.7, 6.1), 0.82, (5.1, 1.1)), ((113.7, 248.7), 0.3, (63.2, 138.8)),
        ((44, 11.3), 0.5, (22.7, 5.8)), ((44, 11.3), 0.6, (18.5, 4.7)), ((44, 11.3), 0.7, (14.5, 3.7)),
        ((44, 11.3), 0.8, (10.4, 2.6)), ((44.3, 11.3), 0.5, (22.7, 5.8)), ((44.3, 11.3), 0.7, (14.5, 3.7)),
        ((44.3, 11.3), 0.8, (10.4, 2.6))}
    assert paper_tables.printed_as(19.851, 19.8) and paper_tables.printed_as(44.255, 44)
    assert not paper_tables.printed_as(8.968, 8.6) and not paper_tables.printed_as(44.255, 44.1)


def test_otd_rows_name_objectives_with_their_settings():
    """Table 13's row "Δt d, step s, Prob p" is an IGSM objective (λ_Jac 0.1) with otd {d, s, p}."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for row in SPEC["tables"]["table13"]["sections"][0]["rows"][:-1]:
        dt, step, prob = (float(part.split()[-1]) for part in row["method"].split(", "))
        objective = config["objectives"][row["ours"]["objective"]]
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


def test_a_cell_reads_its_model_by_columns_not_a_reuse_variant_or_another_criterion():
    # Bugs caught: a block-reuse variant of IGSM (same criterion, ratio and objective) or another
    # criterion's IGSM at the same ratio standing in Table 1's IGSM cell, whichever row comes first.
    frame = experiment_table("cifar10_unet", {
        "diff-pruning-cr0.3/igsm/reuse-dipgo-f0.5": {"fid": 9.0},
        "gradient-flow-cr0.3/igsm": {"fid": 8.0},
        "diff-pruning-cr0.4/igsm": {"fid": 7.0},
        "diff-pruning-cr0.3/igsm": {"fid": 4.6}})
    frame.loc[0, ["criterion", "channel_ratio", "objective", "reuse"]] = ["diff-pruning", 0.3, "igsm", "dipgo"]
    cells = paper_tables.build("table1", {"cifar10_unet": frame}).set_index(["section", "method", "column"])
    igsm = cells.loc[("CIFAR-10 (32×32)", "IGSM", "fid")]
    assert (igsm.ours, igsm.source) == (4.6, "cifar10_unet/diff-pruning-cr0.3/igsm, FID clean, 50000 images")
    alone = paper_tables.build("table1", {"cifar10_unet": frame.iloc[:3]}).set_index(["section", "method", "column"])
    assert alone.loc[("CIFAR-10 (32×32)", "IGSM", "fid")].status == "missing"


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


def test_table4_reads_np_kd_at_lambda_0_and_never_a_paper_number_it_cannot_read(tmp_path):
    """Table 4: λ_Jac = 0 is IGSM's loss without its Jacobian term, NP + KD (not Table 10's NP); a
    cell the paper's text extraction does not let us read shows ours beside "n.t.", never a number
    of the paper's (nor "–", which would say the paper has none)."""
    fids = {"np": 5.3, "np_kd": 5.1, "igsm_lam5e-3": 4.8, "igsm_lam1e-2": 4.7, "igsm": 4.6, "igsm_lam1": 4.9}
    tables = {"cifar10_unet": experiment_table("cifar10_unet", {
        f"diff-pruning-cr0.3/{o}": {"fid": f} for o, f in fids.items()})}
    cells = paper_tables.build("table4", tables)
    untranscribed = cells[cells.status == "untranscribed"]
    assert sorted(untranscribed.column.unique()) == ["fid@1e-3", "fid@5e-3"] and len(untranscribed) == 6
    assert untranscribed.paper.isna().all() and untranscribed.delta.isna().all()
    by_cell = cells.set_index(["method", "column"])
    zero = by_cell.loc[("PR 0.44", "fid@0")]
    assert (zero.status, zero.ours, zero.paper, zero.paper_other) == ("ours", 5.1, 5.01, "Table 3: 5.05")
    assert zero.source.startswith("cifar10_unet/diff-pruning-cr0.3/np_kd, FID")
    stated = by_cell.loc[("PR 0.44", "fid@1e-1")]
    assert (stated.status, stated.ours, stated.paper) == ("ours", 4.6, 4.58)
    five = by_cell.loc[("PR 0.44", "fid@5e-3")]
    assert five.ours == 4.8 and five.source.endswith("the paper's value not transcribed")
    assert by_cell.loc[("PR 0.44", "fid@1e-3")].source == "not run here; the paper's value not transcribed"
    assert by_cell.loc[("PR 0.56", "fid@1")].status == "none"  # the paper prints none there
    markdown = tmp_path / "t4.md"
    paper_tables.write("table4", cells, markdown)
    text = markdown.read_text()
    assert '"n.t.": the paper\'s value not transcribed' in text
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "FID λ=0 (NP+KD)" in header
    line = next(line for line in text.splitlines() if line.startswith("| PR 0.44"))
    assert [c.strip() for c in line.strip("|").split("|")][1:] == [
        "5.10 / 5.01 [Table 3: 5.05] (+0.09)", "– / n.t.", "4.80 / n.t.", "4.70 / 4.75 [Table 10: 4.66] (-0.05)",
        "4.60 / 4.58 (+0.02)", "4.90 / 4.93 (-0.03)"], line
    line = next(line for line in text.splitlines() if line.startswith("| PR 0.56"))
    assert "missing / 5.90" in line and "missing / n.t." in line  # models of the config, not scored here
    # No experiment at all: still no paper number in an untranscribed cell.
    empty = paper_tables.build("table4", {})
    assert empty[empty.status == "untranscribed"].paper.isna().all()
    # Table 10's λ 0 is Diff-Pruning's NP finetune.
    assert paper_tables.heading_of("fid@0", "table10") == "FID λ=0 (NP)"
    assert paper_tables.build("table10", tables).set_index(["method", "column"]).loc[("PR 0.44", "fid@0")].ours == 5.3


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


def cell_models():
    """(table, method, model columns) of every cell that names a model of ours."""
    for name, table in SPEC["tables"].items():
        for section in table["sections"]:
            for row in section["rows"]:
                if "ours" in row:
                    for column in table["columns"]:
                        model = paper_tables._model_of(row, column)
                        if model:
                            yield name, row["method"], model


def test_spec_agrees_with_the_default_config():
    """Every model a table names is a scored model of the default config (so all_tables fills it),
    found by its columns in the experiment's plan."""
    from igsm.config import load_config_file, validate
    from igsm.plan import scored_models

    config = load_config_file(REPO / "config" / "config.yaml")
    validate(config)
    plans = {exp: [(row["criterion"], row["channel_ratio"], row["objective"])
                   for row in scored_models(settings).values() if row["kind"] in ("dense", "finetuned")]
             for exp, settings in config["experiments"].items()}
    for name, method, model in cell_models():
        key = ("", None, "dense") if model["objective"] == "dense" else \
            (model["criterion"], model["channel_ratio"], model["objective"])
        assert key in plans.get(model["experiment"], ()), (name, method, model)


def test_units_and_settings_are_the_papers(tmp_path):
    """Tables 8 and 9 head their memory column "G" as the paper does (the legend says ours are GiB),
    and no title states what the paper does not (Table 8's GPU count: the paper states one only for
    LSUN)."""
    assert "8 A100" in SPEC["tables"]["table8"]["title"] and "1 GPU" not in SPEC["tables"]["table8"]["title"]
    for name in ("table8", "table9"):
        markdown = tmp_path / f"{name}.md"
        paper_tables.write(name, paper_tables.build(name, {}), markdown)
        text = markdown.read_text()
        header = next(line for line in text.splitlines() if line.startswith("| section"))
        assert "Memory (G)" in header and "GiB" not in header and "GiB" not in text.splitlines()[0], name
        assert "ours, the finetune's peak GPU memory in GiB" in text, name


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
    # Every model a row names is scored: Table 5's PR 0.82 / 0.8 rows, Table 4's NP + KD and λ 5e-3.
    for name, _, model in cell_models():
        target = f"results/fid/{model['experiment']}/{paper_tables.variant(model)}.json"
        assert target in proc.stdout, (name, target)
    for exp, model in (("cifar10_unet", "diff-pruning-cr0.7/igsm_lam1e-3"), ("cifar10_uvit", "diff-pruning-cr0.8/np"),
                       ("cifar10_unet", "diff-pruning-cr0.6/np_kd"),
                       ("cifar10_unet", "diff-pruning-cr0.4/igsm_lam5e-3")):
        assert f"results/fid/{exp}/{model}.json" in proc.stdout, model
    for figure in (*paper_tables.FIGURES, *paper_tables.SAMPLE_FIGURES):
        assert f"results/paper_figures/{figure}.pdf" in proc.stdout, figure


def test_reuse_table_sets_dipgo_published_numbers_beside_the_same_method_and_share(tmp_path):
    """igsm/paper/reuse.py: DiP-GO's SD-1.5 headline (CLIP 30.16, 4.4×, 0.8 of the MACs pruned)
    stands beside our DiP-GO variant of the pretrained model at executed share 0.2 only — not
    beside the student's, another method's or another share's (the published pruned share read
    as the executed one would put it on f0.8) — and a model reused by no variant is left out."""
    from igsm.paper.reuse import comparison, published_for, write
    entries = published_for("runwayml/stable-diffusion-v1-5", "ddim", 50)
    assert [e["clip_score"] for e in entries] == [30.16]
    notes = SHARED / "reference" / "pruning-methods-notes.md"
    if notes.is_file():  # the numbers as the reference notes quote them
        assert "CLIP 30.16 (DDIM) on 5k COCO prompts at p=0.8" in notes.read_text()
        assert "4.4 x speedup for SD-1.5" in (SHARED / "reference" / "dip-go-abstract.txt").read_text()
    else:
        skip_or_fail_in_ci(f"{notes} is missing")
    assert published_for("stable-diffusion-v1-5/stable-diffusion-v1-5", "ddim", 50) == entries
    assert published_for("stable-diffusion-v1-5/stable-diffusion-v1-5", "ddim", 25) == []
    models = ["dense", "dense/reuse-dipgo-f0.2", "dense/reuse-dipgo-f0.8", "dense/reuse-deepcache-f0.2",
              "diff-pruning-cr0.5/np", "diff-pruning-cr0.3/igsm", "diff-pruning-cr0.3/igsm/reuse-dipgo-f0.2"]
    table = pd.DataFrame({"model": models, "fid": [20.0, 21.0, 20.5, 22.0, 30.0, 25.0, 26.0],
                          "fid_images": 5000, "clip_score": [31.0, 30.5, 30.9, 29.0, 28.0, 29.5, 29.2],
                          "mac_fraction": [1.0, 0.199, 0.79, 0.2, 1.0, 1.0, 0.198],
                          "sampler_steps": 50, "sampling_speedup": [1.0, 3.9, 1.2, 2.5, None, 1.0, 4.1],
                          # what each variant is (igsm/tables.py, from igsm.plan's rows), not read from its name
                          "base_model": [None, "dense", "dense", "dense", None, None, "diff-pruning-cr0.3/igsm"],
                          "reuse": ["", "dipgo", "dipgo", "deepcache", "", "", "dipgo"],
                          "target_mac_fraction": [None, 0.2, 0.8, 0.2, None, None, 0.2]})
    table.to_csv(tmp_path / "exp.csv", index=False)  # as the rule reads it: "" comes back blank
    table = pd.read_csv(tmp_path / "exp.csv")
    cells = comparison(table, entries).set_index("model")
    assert list(cells.index) == [m for m in models if m != "diff-pruning-cr0.5/np"]
    published = cells.paper_clip_score.dropna()
    assert list(published.index) == ["dense/reuse-dipgo-f0.2"] and published.iloc[0] == 30.16
    row = cells.loc["dense/reuse-dipgo-f0.2"]
    assert row.delta_clip_score == pytest.approx(30.5 - 30.16) and row.paper_speedup == 4.4
    assert row.reuse == "dipgo" and row.target_mac_share == 0.2 and "5k COCO captions" in row.paper_source
    assert cells.loc["dense"].reuse == "full sampler" and cells.loc["dense"].target_mac_share == 1.0
    write(comparison(table, entries), "mscoco_sd15", tmp_path / "t.md", tmp_path / "t.csv", clip_model="openai/clip")
    text = (tmp_path / "t.md").read_text()
    assert "30.16" in text and "openai/clip" in text and "–" in text
    assert pd.read_csv(tmp_path / "t.csv").paper_speedup.notna().sum() == 1
