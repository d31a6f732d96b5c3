"""igsm.tables on hand-made result files for experiments the paper reports (issue 19): the paper's
column holds the paper's number, ours holds ours, the difference is ours − paper's, and rows the
paper does not have get no paper value."""

import json

import pandas as pd
import pytest

from conftest import demo_config, markdown_tables
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
            objective=None, kind=None, reuse=None):
    """The files the workflow writes for one scored model (rules/common.smk table_rows): what it
    is (results/variants/…json, from the config; ``reuse``: a block-reuse variant's base model,
    method and MAC fraction, igsm.plan's row) and its numbers."""
    base = tmp_path / variant.replace("/", "__")
    finetuned = objective is not None
    meta = {"variant": variant, "kind": kind or ("finetuned" if finetuned else variant), "criterion": criterion,
            "channel_ratio": ratio, "objective": objective or variant,
            "weights": OBJECTIVES[objective]["weights"] if finetuned else None,
            "pruned": variant.split("/")[0] if finetuned else None}
    if reuse:
        meta.update(kind="reuse", **dict(zip(("base", "reuse_method", "mac_fraction"), reuse)))
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
                    "diff-pruning", 0.3, "igsm", reuse=("diff-pruning-cr0.3/igsm", "cache", 0.5))]
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


@pytest.fixture
def demo_table(tmp_path):
    """The table of config/demo.yaml's experiment as igsm.tables builds it from the workflow's files:
    every model of its plan (igsm.plan.scored_models, whose rows the variant_metadata rule writes),
    each with the files rules/common.smk table_rows names (FID, efficiency, training summary, PRDC,
    SSIM/PSNR to the dense model), at the demo's sizes and with GPU timings, the widest case."""
    from igsm.config import validate_schema
    from igsm.plan import scored_models

    config = demo_config()
    validate_schema(config)  # the schema's defaults, as the workflow reads the config
    rows = []
    for variant, meta in scored_models(config["experiments"]["digits_unet"], config["objectives"]).items():
        folder = tmp_path / variant
        pruned = meta["kind"] == "finetuned"
        steps = meta.get("sample", {}).get("num_steps", 20)
        macs = 9.15e6 if pruned else 16.25e6
        fraction = meta.get("mac_fraction", 1.0)
        entry = {
            "metadata": write(folder / "variant.json", meta),
            "fid": write(folder / "fid.json", {"fid": 226.46 + 17.3 * len(rows), "num_images": 100, "mode": "clean"}),
            "efficiency": write(folder / "eff.json", {
                "params": 98381 if pruned else 176849, "macs": macs, "images_per_s": 1500.0 if pruned else 1000.0,
                "sampler_steps": steps, "sampling_macs": macs * steps * fraction,
                "sampling_images_per_s": 50.0 * 20 / steps / fraction}),
            "summary": None, "prune_report": None,
            "prdc": write(folder / "prdc.json", {"precision": 0.16, "recall": 0.72, "density": 0.08, "coverage": 0.12}),
        }
        if variant != "dense":  # the dense model is the reference of SSIM and PSNR
            entry["consistency"] = write(folder / "consistency.json", {"ssim": 0.91, "psnr": 17.25})
        if meta["kind"] in ("dense", "finetuned"):
            entry["summary"] = write(folder / "summary.json", {"num_steps": 150, "timing": {
                "wall_time_s": 65.0, "sec_per_step": 0.4, "peak_memory_mib": 512.0}})
        if pruned:
            entry["prune_report"] = write(folder / "report.json", {"paper_label": "0.43"})
        rows.append(entry)
    return tables.build_rows("digits_unet", "digits", "", rows, config["objectives"])


def test_combined_summary_fits_a_terminal(demo_table, tmp_path):
    """results/tables/all.md, what `make demo` prints: every line of every table at most 100
    characters, the CSV with every column. Catches the summary growing back into one wide table
    (26 columns, most cells "–", when issue 32 was filed) or a section taking on columns until it
    wraps in a terminal."""
    md, csv = tmp_path / "all.md", tmp_path / "all.csv"
    tables.write_tables(demo_table, markdown=md, csv=csv, title="All experiments", summary=True)
    widths = {line: len(line) for line in md.read_text().splitlines()}
    assert max(widths.values()) <= 100, max(widths, key=widths.get)
    assert list(pd.read_csv(csv).columns) == list(demo_table.columns)
    assert "all.csv" in md.read_text()


def test_combined_summary_puts_each_model_in_its_section(demo_table, tmp_path):
    """Each model of the demo's plan in the section of its kind, with the columns of that section's
    question; quality (SSIM, PRDC) for every model. Catches a sampler or reuse variant among the
    models (or the other way round), a variant's base model or method lost, a section's number
    read from another column, and a section without any value printed."""
    md = tmp_path / "all.md"
    tables.write_tables(demo_table, markdown=md, summary=True)
    sections = markdown_tables(md)
    name = "digits_unet (digits): "
    assert list(sections) == [name + s for s in ("models", "sampling", "block reuse", "quality")]
    kinds = demo_table.set_index("model")
    models = sections[name + "models"]
    assert [r["model"] for r in models] == ["dense", "untrained", "diff-pruning-cr0.3/np", "diff-pruning-cr0.3/igsm"]
    assert list(models[0]) == ["model", "PR", "params (M)", "MACs (G)", "FID", "speed", "train min"]
    assert (models[2]["PR"], models[2]["params (M)"], models[2]["speed"]) == ("0.43", "0.10", "1.50")
    sampling = sections[name + "sampling"]
    samplers = kinds[kinds.sampler.notna()]
    assert [(r["base model"], r["sampler"], int(r["sampler steps"])) for r in sampling] == \
        list(zip(samplers.base_model, samplers.sampler, samplers.sampler_steps))
    assert {r["sampler"] for r in sampling} == {"ddim", "dpm-solver"}
    dpm_10 = next(r for r in sampling if r["sampler"] == "dpm-solver" and r["sampler steps"] == "10")
    assert (dpm_10["MAC share"], dpm_10["speed-up"]) == ("0.50", "2.00")  # against DDIM's 20 steps
    reuse = sections[name + "block reuse"]
    reused = kinds[kinds.reuse != ""]
    assert [(r["base model"], r["reuse"], r["MAC share"]) for r in reuse] == \
        [(b, m, f"{f:.2f}") for b, m, f in zip(reused.base_model, reused.reuse, reused.mac_fraction)]
    quality = sections[name + "quality"]
    assert [r["model"] for r in quality] == list(demo_table.model)
    assert list(quality[0]) == ["model", "SSIM", "PSNR", "precision", "recall", "density", "coverage"]
    assert quality[0]["SSIM"] == "–" and quality[1]["SSIM"] == "0.91" and quality[1]["coverage"] == "0.12"
    without_quality = demo_table.drop(columns=["ssim_to_dense", "psnr_to_dense", *tables.PRDC_COLUMNS])
    tables.write_tables(without_quality, markdown=md, summary=True)
    assert name + "quality" not in markdown_tables(md)


def test_reuse_and_sampler_variants_say_what_they_vary(demo_table):
    """The table carries what the plan says of a variant (for the reuse table, igsm/paper/reuse.py:
    no name parsed): catches a base model, method or configured share lost on the way."""
    row = demo_table.set_index("model").loc["dense/reuse-dipgo-f0.6"]
    assert (row.base_model, row.reuse, row.target_mac_fraction) == ("dense", "dipgo", 0.6)
    row = demo_table.set_index("model").loc["dense/dpm-solver-10"]
    assert (row.base_model, row.sampler, row.reuse) == ("dense", "dpm-solver", "")
    assert pd.isna(demo_table.set_index("model").loc["diff-pruning-cr0.3/np", "base_model"])


def test_columns_without_values_are_left_out_of_printed_tables(table, tmp_path):
    """One rule for every optional column of an experiment's own table: shown where some row has a
    value. Catches empty columns printed as a wall of "–" (GPU timings on a CPU run, block reuse in
    an experiment without it) and a column with a value dropped."""
    md = tmp_path / "t.md"
    tables.write_tables(table.reset_index(), markdown=md)
    header = list(markdown_tables(md)[""][0])
    assert "reuse" in header and "paper FID" in header  # one row of each has a value
    assert not {"images/s", "speed", "SSIM to dense", "precision", "sampler", "experiment"} & set(header)
    tables.write_tables(table.reset_index().iloc[:2], markdown=md)
    assert "reuse" not in markdown_tables(md)[""][0]
