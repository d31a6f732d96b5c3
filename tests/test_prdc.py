"""PRDC (igsm/stages/prdc.py, igsm.fid): precision, recall, density and coverage (Naeem et al.
2020) from the Inception features the FID's statistics jobs keep.

No Inception here: the statistics stages run with the pixels of tiny images as their "features"
(``pixel_features``), so the kept subsets and the metric can be checked exactly and in seconds.

* A set against itself: the prdc package's values, all exactly 1.
* The stage's JSON against ``prdc.compute_prdc`` on the features the test expects each file to keep.
* The stage against PRDC by explicit loops over the paper's definitions.
* Bad input: features of another Inception mode, too few features for nearest_k, a file without
  features; config errors naming their key.
"""

import json
import re

import numpy as np
import prdc as prdc_package
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, config_errors, demo_config, markdown_tables, modules_loaded_by_command, run_snakemake
from igsm import fid
from igsm.cli import main as cli
from igsm.sampling import save_samples
from igsm.stages.settings import FidSettings

METRICS = ("precision", "recall", "density", "coverage")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_prdc(statistics, reference, out, nearest_k):
    result = invoke("prdc", "--statistics", statistics, "--reference", reference, "--out", out,
                    "--nearest-k", nearest_k, "--threads", 1)
    return result, (json.loads(out.read_text()) if result.exit_code == 0 else None)


def save_features(path, features, mode="clean"):
    """A statistics file keeping every row of ``features``, as the statistics stages write it."""
    fid.save_statistics(path, features, keep=np.arange(len(features)), mode=mode, feature_extractor="test")
    return path


@pytest.mark.parametrize("nearest_k", [1, 3, 5])
def test_prdc_of_a_set_against_itself_is_the_packages_reference_values(tmp_path, nearest_k):
    """The prdc package gives a set against itself precision = recall = density = coverage = 1 for
    any k (each point lies in its own ball; each ball, radius its k-th other point, holds strictly
    the point and k − 1 others: density k/k). The stage returns exactly those values, from two files
    holding the same features. Bugs caught: a version or replacement of the package with "≤" balls
    (density (k + 1)/k) or radii counting the point itself as a neighbour (density (k − 1)/k), a
    stage that reads another set than the files' features."""
    features = np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32)
    direct = prdc_package.compute_prdc(real_features=features, fake_features=features.copy(), nearest_k=nearest_k)
    assert {m: float(direct[m]) for m in METRICS} == dict.fromkeys(METRICS, 1.0)
    ours = fid.precision_recall_density_coverage(features, features, nearest_k)
    assert ours == dict.fromkeys(METRICS, 1.0)
    one, other = save_features(tmp_path / "a.npz", features), save_features(tmp_path / "b.npz", features)
    result, payload = run_prdc(one, other, tmp_path / "p.json", nearest_k)
    assert result.exit_code == 0, result.output
    assert {m: payload[m] for m in METRICS} == dict.fromkeys(METRICS, 1.0)
    assert (payload["num_real"], payload["num_fake"], payload["nearest_k"]) == (60, 60, nearest_k)


# ---- the statistics stages keep the features PRDC reads --------------------------------------------

SIDE = 3  # 3×3 one-channel images: 9 "features" each


def pixel_features(images, settings, device, threads, batch_size):
    """The statistics stages' feature step, replaced: each image's pixels as its feature vector."""
    found = np.asarray(images[0:len(images)], dtype=np.float32).reshape(len(images), -1)
    return found, {"mode": settings.mode, "feature_extractor": "pixels (test)"}


def gaussian_images(seed, num, spread):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128, spread, size=(num, SIDE, SIDE, 1)), 0, 255).round().astype(np.uint8)


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """A reference store of 150 widely spread images, kept: 100 of them chosen by seed 3; a model's
    80 samples, concentrated near the mean (high precision, low recall), kept: its first 60."""
    from igsm.data import write_store
    from igsm.stages import fid as fid_stage

    monkeypatch.setattr(fid_stage, "features", pixel_features)
    real_images, fake_images = gaussian_images(0, 150, 40.0), gaussian_images(1, 80, 12.0)
    write_store(tmp_path / "train", [(real_images, np.zeros(150, np.int64))])
    reference, statistics = tmp_path / "reference.npz", tmp_path / "stats.npz"
    fid_stage.fid_reference(str(tmp_path / "train"), reference, FidSettings.from_dict(
        {"mode": "clean", "num_reference": 150, "prdc": {"num_features": 100, "seed": 3}}), "cpu", 1, 50)
    save_samples(tmp_path / "samples.npz", fake_images, np.arange(500, 580), {"sampler": "ddim"})
    fid_stage.fid_statistics(str(tmp_path / "samples.npz"), statistics,
                             FidSettings.from_dict({"mode": "clean", "prdc": {"num_features": 60}}), "cpu", 1, 50)
    chosen = np.sort(np.random.default_rng(3).choice(150, size=100, replace=False))
    return {"reference": reference, "statistics": statistics, "chosen": chosen,
            "real": real_images.reshape(150, -1).astype(np.float32),
            "fake": fake_images.reshape(80, -1).astype(np.float32)}


def test_stage_equals_compute_prdc_on_the_images_each_file_keeps(kept, tmp_path):
    """The files keep the reference images chosen by prdc.seed (numpy's default_rng(seed).choice
    among fid.num_reference, sorted) and the model's first images; the stage's JSON equals
    prdc.compute_prdc(real = the reference's, fake = the model's) on exactly those. The sets are
    built so that precision and recall differ by far. Bugs caught: another subset (unseeded, first
    images of the reference, the model's last ones), real and generated sets swapped (precision
    and recall exchanged), another k than nearest_k, features stored rounded (float16), statistics
    changed by keeping features."""
    real, real_rows, real_metadata = fid.load_features(kept["reference"])
    fake, fake_rows, fake_metadata = fid.load_features(kept["statistics"])
    np.testing.assert_array_equal(real_rows, kept["chosen"])
    np.testing.assert_array_equal(real, kept["real"][kept["chosen"]])
    np.testing.assert_array_equal(fake_rows, np.arange(60))
    np.testing.assert_array_equal(fake, kept["fake"][:60])
    assert real.dtype == fake.dtype == np.float32  # Inception's own precision, not rounded to keep files small
    assert real_metadata["kept_features"] == {"num": 100, "of": 150, "asked": 100, "chosen": "at random, seed 3"}
    assert fake_metadata["kept_features"] == {"num": 60, "of": 80, "asked": 60, "chosen": "first images"}
    stats = fid.load_statistics(kept["reference"])  # mu and sigma still of all 150 images
    np.testing.assert_allclose(stats.mu, kept["real"].mean(0), rtol=1e-6)
    assert stats.num_images == 150

    result, payload = run_prdc(kept["statistics"], kept["reference"], tmp_path / "p.json", 4)
    assert result.exit_code == 0, result.output
    expected = prdc_package.compute_prdc(real_features=kept["real"][kept["chosen"]],
                                         fake_features=kept["fake"][:60], nearest_k=4)
    assert {m: payload[m] for m in METRICS} == {m: float(expected[m]) for m in METRICS}
    assert payload["precision"] > 0.9 and payload["recall"] < 0.6, payload  # a swap would show
    assert (payload["num_real"], payload["num_fake"], payload["nearest_k"], payload["mode"]) == (100, 60, 4, "clean")
    from igsm.data import file_digest

    assert payload["reference_sha256"] == file_digest(kept["reference"])
    assert payload["statistics_sha256"] == file_digest(kept["statistics"])
    assert payload["real_features"]["chosen"] == "at random, seed 3"
    assert set(payload["prdc_versions"]) == {"prdc", "scikit-learn", "numpy"}


def test_the_fid_job_writes_the_prdc_stages_json_and_an_unchanged_fid(kept, tmp_path):
    """With --prdc-out, `igsm fid` (the workflow's fid_prdc jobs) also writes PRDC of the same two
    files: the JSON `igsm prdc` writes alone, beside the FID JSON `igsm fid` writes without the option.
    Bugs caught: the FID job's PRDC computed on other features or with another k (its own default
    instead of --nearest-k), real and generated swapped there only, the FID moved by the PRDC option."""
    settings = json.dumps({"mode": "clean", "num_reference": 150})
    plain = invoke("fid", "--statistics", kept["statistics"], "--reference", kept["reference"],
                   "--out", tmp_path / "plain.json", "--settings", settings, "--threads", 1)
    both = invoke("fid", "--statistics", kept["statistics"], "--reference", kept["reference"],
                  "--out", tmp_path / "fid.json", "--prdc-out", tmp_path / "prdc.json", "--nearest-k", 4,
                  "--settings", settings, "--threads", 1)
    assert plain.exit_code == 0 and both.exit_code == 0, (plain.output, both.output)
    assert (tmp_path / "fid.json").read_text() == (tmp_path / "plain.json").read_text()
    alone, payload = run_prdc(kept["statistics"], kept["reference"], tmp_path / "alone.json", 4)
    assert alone.exit_code == 0, alone.output
    assert json.loads((tmp_path / "prdc.json").read_text()) == payload
    expected = prdc_package.compute_prdc(real_features=kept["real"][kept["chosen"]],
                                         fake_features=kept["fake"][:60], nearest_k=4)
    assert {m: payload[m] for m in METRICS} == {m: float(expected[m]) for m in METRICS}


def test_the_fid_and_prdc_jobs_start_without_torch(kept, tmp_path):
    """The FID's distance and PRDC read statistics files only (numpy, SciPy, scikit-learn): their
    process imports no torch, torchvision or clean-fid. Bug caught: a module-level import of them on
    that path (igsm.feature_statistics, the fid or prdc stage, the CLI), which costs each of the demo's
    14 FID jobs ~4 s of CPU again (BENCHMARKS.md, "CPU demo")."""
    loaded = modules_loaded_by_command("fid", "--statistics", kept["statistics"], "--reference", kept["reference"],
                                       "--out", tmp_path / "f.json", "--prdc-out", tmp_path / "p.json",
                                       "--nearest-k", 4, "--threads", 1)
    assert loaded == "[]", loaded
    assert (tmp_path / "f.json").is_file() and (tmp_path / "p.json").is_file()


def test_all_images_kept_when_fewer_than_num_features_and_none_without_prdc(tmp_path, monkeypatch):
    """prdc.num_features is at most: a set smaller than it keeps every image; a statistics job
    without PRDC keeps none (its file as before PRDC), and the stage names that file."""
    from igsm.stages import fid as fid_stage

    monkeypatch.setattr(fid_stage, "features", pixel_features)
    save_samples(tmp_path / "samples.npz", gaussian_images(1, 20, 12.0), np.arange(20), {})
    fid_stage.fid_statistics(str(tmp_path / "samples.npz"), tmp_path / "all.npz",
                             FidSettings.from_dict({"mode": "clean", "prdc": {"num_features": 10000}}), "cpu", 1, 50)
    assert len(fid.load_features(tmp_path / "all.npz")[0]) == 20
    fid_stage.fid_statistics(str(tmp_path / "samples.npz"), tmp_path / "none.npz",
                             FidSettings.from_dict({"mode": "clean"}), "cpu", 1, 50)
    with np.load(tmp_path / "none.npz") as data:
        assert sorted(data.files) == ["metadata", "mu", "num_images", "sigma"]
    result, _ = run_prdc(tmp_path / "none.npz", tmp_path / "all.npz", tmp_path / "p.json", 5)
    assert result.exit_code == 1 and re.search(r"none\.npz: no kept Inception features .*prdc\.enabled", result.output)
    assert not (tmp_path / "p.json").exists()


# ---- the definitions, by explicit loops ------------------------------------------------------------


def prdc_by_loops(real, fake, k):
    """Naeem et al. 2020, Eqs. (1)-(4) with the k-NN radius of Kynkäänniemi et al.: a point's radius is
    the distance to its k-th nearest *other* point of its set; "inside a ball" is strictly closer."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def distance(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    def radii(points):
        out = []
        for i, p in enumerate(points):
            others = sorted(distance(p, q) for j, q in enumerate(points) if j != i)
            out.append(others[k - 1])
        return out

    real_radius, fake_radius = radii(real), radii(fake)
    precision = np.mean([any(distance(y, x) < r for x, r in zip(real, real_radius)) for y in fake])
    recall = np.mean([any(distance(x, y) < s for y, s in zip(fake, fake_radius)) for x in real])
    density = sum(distance(y, x) < r for y in fake for x, r in zip(real, real_radius)) / (k * len(fake))
    coverage = np.mean([min(distance(x, y) for y in fake) < r for x, r in zip(real, real_radius)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("nearest_k", [1, 2, 5])
def test_stage_equals_prdc_by_explicit_loops(tmp_path, nearest_k):
    """30 real and 24 generated 4-D points (the generated shifted and narrower): the stage's JSON
    equals the four definitions evaluated point by point. Bugs caught: a wrong k (k ± 1), a radius
    counting the point's zero distance to itself as its first neighbour, "≤" balls, density not
    divided by k, real and generated sets swapped."""
    rng = np.random.default_rng(nearest_k)
    real = rng.normal(size=(30, 4)).astype(np.float32)
    fake = (rng.normal(size=(24, 4)) * 0.6 + 0.5).astype(np.float32)
    expected = prdc_by_loops(real, fake, nearest_k)
    assert expected["precision"] != expected["recall"]  # so that a swap is seen
    result, payload = run_prdc(save_features(tmp_path / "fake.npz", fake), save_features(tmp_path / "real.npz", real),
                               tmp_path / "p.json", nearest_k)
    assert result.exit_code == 0, result.output
    assert {m: payload[m] for m in METRICS} == pytest.approx(expected, abs=1e-12)


# ---- bad input -------------------------------------------------------------------------------------


def test_other_mode_and_too_few_features_are_refused_naming_file_and_key(tmp_path):
    """Bugs caught: PRDC of features of two different Inception networks computed as if comparable,
    and a k too large for the sets (the package fails in numpy's argpartition with "kth(=5) out of
    bounds", naming neither the key nor the file)."""
    rng = np.random.default_rng(0)
    clean = save_features(tmp_path / "clean.npz", rng.normal(size=(10, 4)))
    legacy = save_features(tmp_path / "legacy.npz", rng.normal(size=(10, 4)), mode="legacy_pytorch")
    result, _ = run_prdc(clean, legacy, tmp_path / "a.json", 3)
    assert result.exit_code == 1 and re.search(r"clean\.npz: features of Inception mode 'clean', but \S*legacy\.npz "
                                               r"holds mode 'legacy_pytorch' \(fid\.mode\)", result.output)
    small = save_features(tmp_path / "small.npz", rng.normal(size=(5, 4)))
    result, _ = run_prdc(small, clean, tmp_path / "b.json", 5)
    assert result.exit_code == 1 and re.search(r"prdc\.nearest_k: 5 needs at least 7 features in each set, but "
                                               r"\S*small\.npz keeps 5", result.output)
    result, _ = run_prdc(small, clean, tmp_path / "b.json", 4)  # the package partitions at k + 1 = 5: too few
    assert result.exit_code == 1 and "needs at least 6 features" in result.output
    result, payload = run_prdc(small, clean, tmp_path / "c.json", 3)  # 5 features: k = 3 is the most
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


# ---- config ------------------------------------------------------------------------------------------


def test_prdc_config_errors_name_their_key(tmp_path):
    """Bugs caught: PRDC beside a supplied reference file (mu and sigma: no features to read) or with
    a k no set can reach accepted until a job fails hours later; a bad value without its key."""
    config = demo_config()
    exp = config["experiments"]["digits_unet"]
    assert exp["prdc"]["enabled"] and config_errors(config) == ""  # the demo scores PRDC
    supplied = tmp_path / "published.npz"
    np.savez(supplied, mu=np.zeros(2), sigma=np.eye(2))
    exp["fid"]["reference_statistics"] = str(supplied)
    exp["fid"]["num_reference"] = 0
    errors = config_errors(config)
    assert re.search(r"^experiments\.digits_unet\.prdc\.enabled: true beside fid\.reference_statistics", errors,
                     re.M), errors
    exp["prdc"]["enabled"] = False  # the same reference without PRDC is fine
    assert config_errors(config) == ""
    exp["fid"]["reference_statistics"] = ""
    exp["fid"]["num_reference"] = 100
    exp["prdc"] = {"enabled": True, "nearest_k": 49}  # the demo's models have 50 images, k + 2 = 51
    errors = config_errors(config)
    assert re.search(r"^experiments\.digits_unet\.prdc\.nearest_k: 49 needs at least 51 features in each set, but "
                     r"sample\.num_images is 50", errors, re.M), errors
    assert "fid.num_reference" not in errors  # its 100 images are enough
    exp["prdc"] = {"enabled": True, "nearest_k": 48}
    assert config_errors(config) == ""
    exp["prdc"] = {"enabled": True, "nearest_k": 5, "num_features": 6}
    assert re.search(r"^experiments\.digits_unet\.prdc\.nearest_k: 5 .* but prdc\.num_features is 6",
                     config_errors(config), re.M)
    for bad in ({"nearest_k": 0}, {"num_features": 1}, {"seed": -1}, {"enabled": "yes"}):
        exp["prdc"] = {"enabled": True, **bad}
        key = next(iter(bad))
        assert f"experiments.digits_unet.prdc.{key}" in config_errors(config), (bad, config_errors(config))


def test_prdc_columns_only_where_models_were_scored(tmp_path):
    """The experiment's table reads each model's PRDC JSON (rules/common.smk table_rows, every model
    of an experiment with prdc.enabled): four columns with its numbers, none in a table without
    them, and the combined table's summary shows them in its quality section. Bugs caught: another
    file's number in a column, a metric in the wrong column, empty PRDC columns in every table."""
    import pandas as pd

    from igsm.tables import build_rows, write_tables
    from test_clip_score import header_and_row, table_files

    rows = [table_files(tmp_path / "s", "dense", 50.0), table_files(tmp_path / "s", "untrained", 90.0)]
    for row, values in zip(rows, ((0.75, 0.5, 0.875, 0.625), (0.25, 0.125, 0.0625, 0.375))):
        path = tmp_path / f"{row['metadata'].split('/')[-2]}-prdc.json"
        path.write_text(json.dumps({**dict(zip(METRICS, values)), "nearest_k": 5}))
        row["prdc"] = str(path)
    table = build_rows("unet", "digits", "", rows)
    assert table.set_index("model").loc["untrained", list(METRICS)].tolist() == [0.25, 0.125, 0.0625, 0.375]
    write_tables(table, markdown=tmp_path / "s.md", csv=tmp_path / "s.csv")
    header, row = header_and_row(tmp_path / "s.md", "dense")
    assert [row[m] for m in METRICS] == ["0.75", "0.50", "0.88", "0.62"]
    plain = build_rows("unet", "digits", "", [table_files(tmp_path / "p", "dense", 40.0)])
    assert not set(METRICS) & set(plain.columns)
    write_tables(plain, markdown=tmp_path / "p.md", csv=tmp_path / "p.csv")
    header, _ = header_and_row(tmp_path / "p.md", "dense")
    assert not set(METRICS) & set(header)
    combined = pd.concat([pd.read_csv(tmp_path / f"{n}.csv") for n in ("p", "s")], ignore_index=True)
    write_tables(combined, markdown=tmp_path / "all.md", summary=True)
    quality = markdown_tables(tmp_path / "all.md")["unet (digits): quality"]  # its section of the summary
    row = next(row for row in quality if row["model"] == "untrained")
    assert [row[m] for m in METRICS] == ["0.25", "0.12", "0.06", "0.38"]


# ---- the workflow's plan -----------------------------------------------------------------------------


def test_a_borrowed_dense_model_with_prdc_keeps_features_of_the_owners_samples(tmp_path):
    """config/fashion_mnist.yaml's fmnist_reuse borrows fmnist_unet's teacher with the same samples
    and reads fmnist_unet's statistics. With PRDC on fmnist_reuse alone, its dense statistics must
    keep features, which the owner's file does not: it gets its own statistics job, reading the
    owner's samples, and a reference file that keeps features; nothing else changes. Bugs caught:
    a prdc job given a statistics file without features (failing after the GPU jobs), the teacher's
    images sampled a second time, jobs of experiments without PRDC changed by it."""
    from test_config import job_counts, planned

    config = yaml.safe_load((REPO / "config" / "fashion_mnist.yaml").read_text())
    path = tmp_path / "config.yaml"

    def dry_run():
        path.write_text(yaml.safe_dump(config))
        proc = run_snakemake("all_tables", "-n", "-p", "--configfile", str(path), check=False)
        assert proc.returncode == 0, proc.stdout[-3000:]
        jobs = planned(proc.stdout)
        commands = {rule: sorted(next(line for line in block.splitlines() if "python -m igsm" in line)
                                 for block in blocks if "python -m igsm" in block)
                    for rule, blocks in jobs.items()}
        return job_counts(proc.stdout), commands

    counts, commands = dry_run()
    config["experiments"]["fmnist_reuse"]["prdc"] = {"enabled": True}
    with_prdc, prdc_commands = dry_run()
    scored = sum("results/fid/fmnist_reuse/" in c for c in commands["fid"])
    # Its FID jobs also write PRDC (rule fid_prdc); the other experiments' stay plain FID jobs.
    assert with_prdc["fid_prdc"] == scored and with_prdc["fid"] == counts["fid"] - scored
    assert with_prdc["sample"] == counts["sample"]
    assert with_prdc["fid_statistics"] == counts["fid_statistics"] + 1
    assert with_prdc["fid_reference"] == counts["fid_reference"] + 1
    statistics = [c for c in prdc_commands["fid_statistics"] if "--out results/fid_stats/fmnist_reuse/dense.npz" in c]
    assert len(statistics) == 1 and "--samples results/samples/fmnist_unet/dense/samples.npz" in statistics[0]
    assert '"prdc": {"num_features": 10000}' in statistics[0]
    assert all("-features10000-seed0.npz" in c and "--prdc-out results/prdc/fmnist_reuse/" in c
               for c in prdc_commands["fid_prdc"])
    for rule in ("sample", "fid_statistics", "fid_reference", "fid"):  # the other experiments' jobs, unchanged
        others = [c for c in commands[rule] if "fmnist_reuse/" not in c]
        assert others and set(others) <= set(prdc_commands[rule]), rule
