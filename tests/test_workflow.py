"""The demo DAG end to end through Snakemake, with tiny settings: every stage for real."""

import copy
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from conftest import markdown_tables, snakemake_in
from igsm.sampling import load_samples

pytestmark = pytest.mark.slow

REUSE_VARIANTS = [f"dense/reuse-{method}-f0.6" for method in ("dipgo", "deepcache", "reuse-eps", "fewer-steps")]
SAMPLER_VARIANTS = ["dense/ddim-10", "dense/dpm-solver-10"]  # conftest.tiny_demo_config's compare_samplers


def test_every_table_row_present_with_real_numbers(demo_run):
    workdir, config = demo_run
    import pandas as pd

    table = pd.read_csv(workdir / "results" / "tables" / "digits_unet.csv")
    assert sorted(table.model) == sorted(
        ["dense", "untrained", "diff-pruning-cr0.3/np", "diff-pruning-cr0.3/igsm"] + REUSE_VARIANTS + SAMPLER_VARIANTS)
    assert all(math.isfinite(f) and f > 0 for f in table.fid)
    fid = dict(zip(table.model, table.fid))
    assert fid["dense"] < fid["untrained"], fid
    params = dict(zip(table.model, table.params_M))
    macs = dict(zip(table.model, table.macs_G))
    for variant in ("diff-pruning-cr0.3/np", "diff-pruning-cr0.3/igsm"):
        assert params[variant] < params["dense"] and macs[variant] < macs["dense"]
    assert params["untrained"] == params["dense"]
    steps = dict(zip(table.model, table.training_steps))
    assert steps["dense"] == 150 and steps["diff-pruning-cr0.3/igsm"] == 10
    assert set(table.fid_images) == {32}
    # The sampler variants: DDIM at the dense model's own 10 steps is its samples (the same FID, no
    # samples of its own); DPM-Solver's images are its own, its row names its sampler and steps.
    assert fid["dense/ddim-10"] == fid["dense"] and fid["dense/dpm-solver-10"] != fid["dense"]
    assert not (workdir / "results" / "samples" / "digits_unet" / "dense" / "ddim-10").exists()
    sampler = dict(zip(table.model, table.sampler.fillna("")))
    assert sampler["dense/dpm-solver-10"] == "dpm-solver" and sampler["dense"] == ""
    assert dict(zip(table.model, table.sampler_steps))["dense/dpm-solver-10"] == 10
    _, _, metadata = load_samples(workdir / "results" / "samples" / "digits_unet" / "dense" / "dpm-solver-10" /
                                  "samples.npz")
    assert metadata["sampler"] == "dpm-solver" and metadata["sampler_kwargs"] == {"num_steps": 10,
                                                                                   "algorithm": "dpmsolver++"}
    for name in ("digits_unet.md", "digits_unet.tex", "all.md", "all.csv"):
        assert (workdir / "results" / "tables" / name).stat().st_size > 0
    score = json.loads((workdir / "results" / "fid" / "digits_unet" / "dense.json").read_text())
    assert score["mode"] == "clean" and score["num_images"] == 32 and score["num_reference"] == 64


def test_block_reuse_variants_meet_their_mac_fraction(demo_run):
    """The demo's reuse section: a gate table per method (bar fewer-steps) stored next to the
    variant, sampled with (the samples' metadata carries its digest), and the table's MAC share
    at or under the target; fewer-steps samples with ⌊0.6 × 10⌋ = 6 steps."""
    workdir, config = demo_run
    import pandas as pd

    from igsm.reuse import ReusePlan
    from igsm.sampling import load_samples

    table = pd.read_csv(workdir / "results" / "tables" / "digits_unet.csv").set_index("model")
    reuse = config["experiments"]["digits_unet"]["reuse"]
    target = reuse["mac_fractions"][0]
    for variant in REUSE_VARIANTS:
        method = table.loc[variant, "reuse"]
        assert variant == f"dense/reuse-{method}-f{target:g}"
        assert 0.3 < table.loc[variant, "mac_fraction"] <= target + 1e-9, variant
        assert table.loc[variant, "params_M"] == table.loc["dense", "params_M"]
        _, _, metadata = load_samples(workdir / "results" / "samples" / "digits_unet" / variant / "samples.npz")
        folder = workdir / "results" / "reuse" / "digits_unet" / variant
        if method == "fewer-steps":
            assert not folder.exists() and table.loc[variant, "sampler_steps"] == 6
            assert metadata["sampler_kwargs"]["num_steps"] == 6 and "reuse_plan" not in metadata
            continue
        plan = ReusePlan.load(folder / "plan.json")
        assert plan.method == method and plan.mac_fraction() == pytest.approx(table.loc[variant, "mac_fraction"])
        assert metadata["reuse_plan"] == plan.digest() and metadata["sampler_kwargs"]["num_steps"] == 10
        assert Image.open(folder / "plan.png").size[0] > 100
    assert table.loc["dense", "mac_fraction"] == 1.0
    # DiP-GO trained its pruner for the configured steps, on the sampler's own chains.
    history = ReusePlan.load(workdir / "results" / "reuse" / "digits_unet" / "dense" / "reuse-dipgo-f0.6" /
                             "plan.json").metadata["history"]
    assert len(history) == reuse["learn"]["train_steps"]


def test_prdc_of_every_model_from_the_features_the_fid_jobs_kept(demo_run):
    """The demo's prdc section (enabled, k = 5): precision, recall, density and coverage of every
    model in its table and in the combined one, from the FID's own reference file, which kept all
    64 reference images' features (fewer than num_features), and each model's 32. Bugs caught: no
    PRDC columns in the demo's tables, PRDC against another reference than the FID's, a subset
    other than asked."""
    workdir, _ = demo_run
    import pandas as pd

    metrics = ["precision", "recall", "density", "coverage"]
    table = pd.read_csv(workdir / "results" / "tables" / "digits_unet.csv")
    assert table[metrics].notna().all().all(), table[["model"] + metrics]
    bounded = table[["precision", "recall", "coverage"]]
    assert ((bounded >= 0) & (bounded <= 1)).all().all() and (table.density >= 0).all()
    score = json.loads((workdir / "results" / "prdc" / "digits_unet" / "dense.json").read_text())
    fid_score = json.loads((workdir / "results" / "fid" / "digits_unet" / "dense.json").read_text())
    assert score["reference"] == fid_score["reference"] == "results/fid_reference/digits/clean-n64-features10000-seed0.npz"
    assert (score["num_real"], score["num_fake"], score["nearest_k"], score["mode"]) == (64, 32, 5, "clean")
    # What `make demo` prints: the four beside every model, in the quality section of the summary.
    quality = markdown_tables(workdir / "results" / "tables" / "all.md")["digits_unet (digits): quality"]
    assert [row["model"] for row in quality] == list(table.model)
    assert all(row[metric] != "–" for row in quality for metric in metrics), quality


def test_ssim_and_psnr_of_every_model_to_the_dense_samples(demo_run):
    """The demo's consistency section (issue 32's Done-when: the demo's table has SSIM to the
    teacher and PSNR): every model but the dense one compared seed by seed with the dense model's
    samples. DDIM at the dense model's own 10 steps is the dense samples themselves: SSIM exactly 1,
    every pair identical (PSNR over no differing pair: none). Bugs caught: no SSIM/PSNR columns in
    the demo's tables, a model compared with its own samples or with another model's, the dense
    model compared with itself (a row of 1s that says nothing)."""
    workdir, _ = demo_run
    import pandas as pd

    table = pd.read_csv(workdir / "results" / "tables" / "digits_unet.csv").set_index("model")
    assert table.loc["dense", ["ssim_to_dense", "psnr_to_dense"]].isna().all()
    assert not (workdir / "results" / "consistency" / "digits_unet" / "dense.json").exists()
    same = json.loads((workdir / "results" / "consistency" / "digits_unet" / "dense" / "ddim-10.json").read_text())
    assert (same["ssim"], same["psnr"], same["identical_images"], same["num_images"]) == (1.0, None, 32, 32)
    others = table.drop(["dense", "dense/ddim-10"])
    assert others.ssim_to_dense.notna().all() and (others.ssim_to_dense < 1).all(), others.ssim_to_dense
    assert others.psnr_to_dense.notna().all() and (others.psnr_to_dense > 0).all(), others.psnr_to_dense


def test_grids_are_images(demo_run):
    workdir, _ = demo_run
    grids = sorted((workdir / "results" / "samples").rglob("grid.png"))
    assert len(grids) == 4 + len(REUSE_VARIANTS) + 1  # and DPM-Solver's (DDIM-10 is the dense model's)
    for grid in grids:
        with Image.open(grid) as img:
            pixels = np.asarray(img)
        assert img.format == "PNG" and pixels.std() > 0


def test_html_report_of_the_demo(demo_run):
    """`snakemake --report`: one self-contained file with every sample grid and table, captioned."""
    workdir, config = demo_run
    report = workdir / "report.html"
    proc = snakemake_in(workdir, config, "--report", str(report))
    assert proc.returncode == 0, proc.stdout[-5000:]
    html = report.read_text()
    grids = sorted((workdir / "results" / "samples").rglob("grid.png"))
    assert proc.stdout.count("Adding grid.png") == len(grids) == 4 + len(REUSE_VARIANTS) + 1
    assert "Samples" in html and "Tables" in html and "digits_unet" in html
    assert "<script" in html and len(html) > 100_000  # the images are embedded, not linked


def test_training_metrics_are_jsonl(demo_run):
    workdir, _ = demo_run
    lines = (workdir / "results/finetune/digits_unet/diff-pruning-cr0.3/igsm/metrics.jsonl").read_text()
    records = [json.loads(line) for line in lines.splitlines()]
    assert [r["step"] for r in records] == [5, 10]
    assert {"loss", "np", "kd", "jm2"} <= set(records[0])


def test_rerun_does_nothing(demo_run):
    workdir, config = demo_run
    proc = snakemake_in(workdir, config, "-n", "all_tables")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout, proc.stdout[-3000:]


def test_another_gpu_count_reruns_nothing(demo_run):
    """GPUs per job are resources: the images do not depend on them, so finished jobs stay valid."""
    workdir, config = demo_run
    changed = copy.deepcopy(config)
    changed.setdefault("resources", {}).update(sample={"gpu": 2}, finetune={"gpu": 2})
    proc = snakemake_in(workdir, changed, "-n", "all_tables")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout, proc.stdout[-3000:]


def planned_jobs(output):
    return set(re.findall(r"^rule (\w+):", output, re.M)) | set(re.findall(r"^localrule (\w+):", output, re.M))


def test_changed_finetune_setting_reruns_only_what_depends_on_it(demo_run):
    workdir, config = demo_run
    changed = copy.deepcopy(config)
    changed["experiments"]["digits_unet"]["finetune"]["training"]["lr"] = 1e-4
    proc = snakemake_in(workdir, changed, "-n", "all_tables")
    assert proc.returncode == 0, proc.stdout[-3000:]
    jobs = planned_jobs(proc.stdout)
    assert {"finetune", "sample", "fid_prdc", "consistency", "tables"} <= jobs
    assert not jobs & {"download", "dense_trained", "untrained", "prune", "fid_reference"}
    # Only the finetuned variants are resampled: the dense and untrained samples stay (they are read,
    # as the SSIM reference of the finetuned models' consistency jobs, but no job writes them).
    assert not re.search(r"output: results/samples/digits_unet/(dense|untrained)/", proc.stdout)


def test_failed_job_leaves_nothing_that_looks_complete(demo_run):
    workdir, config = demo_run
    broken = copy.deepcopy(config)
    broken["objectives"]["exploding"] = {"weights": {"np": 1.0}}
    exp = broken["experiments"]["digits_unet"]
    exp["finetune"]["runs"] = [{"channel_ratio": 0.3, "objectives": ["exploding"]}]
    exp["finetune"]["training"]["lr"] = 1e12  # the loss turns non-finite: the loop stops
    target = "results/finetune/digits_unet/diff-pruning-cr0.3/exploding/model"
    proc = snakemake_in(workdir, broken, target)
    assert proc.returncode != 0
    out = workdir / "results/finetune/digits_unet/diff-pruning-cr0.3/exploding"
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    log = (workdir / "results/logs/finetune/digits_unet/diff-pruning-cr0.3/exploding.log").read_text()
    assert "loss is" in log


def test_the_demo_writes_model_cards_huggingface_hubs_parser_reads(demo_run, tmp_path):
    """`make demo`'s default target writes a release folder per dense, pruned and finetuned model
    (issue 32, item 3), each card's model-index holding the FID file's value and image count; only the
    dense U-Net gets diffusers' files. Run on a copy: the session's demo stays as other tests expect it."""
    import shutil
    import time

    from huggingface_hub import ModelCard

    workdir, config = demo_run
    copied = tmp_path / "demo"
    shutil.copytree(workdir, copied, symlinks=True)
    started = time.monotonic()
    proc = snakemake_in(copied, config, "model_cards")
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert planned_jobs(proc.stdout) == {"release", "model_cards"}, proc.stdout[-5000:]
    release = copied / "results" / "release" / "digits_unet"
    folders = {"dense": True, "pruned/diff-pruning-cr0.3": False, "finetuned/diff-pruning-cr0.3/np": False,
               "finetuned/diff-pruning-cr0.3/igsm": False}
    for name, loads_with_diffusers in folders.items():
        # Bar Snakemake's .snakemake_timestamp in a directory() output, which publishing leaves out.
        files = {p.name for p in (release / name).iterdir() if p.name != ".snakemake_timestamp"}
        assert files == {"README.md", "architecture.json", "model.safetensors"} | (
            {"config.json", "diffusion_pytorch_model.safetensors"} if loads_with_diffusers else set()), (name, files)
        card = ModelCard.load(release / name / "README.md")
        if name.startswith("pruned/"):
            assert card.data.eval_results is None
            continue
        fid = json.loads((copied / "results" / "fid" / "digits_unet" / f"{name.removeprefix('finetuned/')}.json")
                         .read_text())
        (result,) = card.data.eval_results
        assert result.metric_value == fid["fid"] and result.metric_args["num_images"] == fid["num_images"] == 32
    print(f"model_cards: {seconds:.1f} s for {len(folders)} release folders")  # the demo's extra time
