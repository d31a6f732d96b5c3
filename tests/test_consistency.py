"""The consistency stage (igsm/stages/consistency.py): SSIM and PSNR of a model's samples to the
dense model's of the same seeds.

* PSNR per pair against 10·log10(1 / MSE) computed by hand on the [0, 1] images (catches a data
  range of 255, a mean over the batch instead of per image).
* SSIM is 1 for identical images and falls with added noise; pairs are made by seed, not position
  (a reference file in another order gives the same numbers); a seed missing from the reference,
  or identical pairs (infinite PSNR), are reported, not averaged in.
"""

import json

import numpy as np
import pytest

from igsm.sampling import save_samples
from igsm.stages.common import StageError
from igsm.stages.consistency import consistency, image_metrics


def images(seed, n=6, side=16, channels=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, channels), dtype=np.uint8)


def noisy(base, scale, seed=1):
    noise = np.random.default_rng(seed).normal(0, scale, size=base.shape)
    return np.clip(base.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def test_psnr_by_hand_and_ssim_falls_with_noise():
    reference = images(0, channels=3)
    slightly, badly = noisy(reference, 5.0), noisy(reference, 40.0)
    ssim, psnr = image_metrics(slightly, reference, batch_size=4)  # two batches: per pair, not per batch
    mse = ((slightly / 255.0 - reference / 255.0) ** 2).reshape(len(reference), -1).mean(1)
    np.testing.assert_allclose(psnr, 10 * np.log10(1 / mse), rtol=1e-6)  # torchmetrics sums in float32
    bad_ssim, _ = image_metrics(badly, reference)
    same_ssim, same_psnr = image_metrics(reference, reference)
    np.testing.assert_allclose(same_ssim, 1.0, rtol=1e-12)
    assert np.isinf(same_psnr).all()
    assert (bad_ssim < ssim).all() and (ssim < 1).all() and (bad_ssim > -1).all()
    small_ssim, _ = image_metrics(noisy(images(3, side=8), 5.0), images(3, side=8))  # window shrunk to 7
    assert small_ssim.shape == (6,) and np.isfinite(small_ssim).all()


def test_pairs_by_seed_and_reports_what_it_cannot_average(tmp_path):
    dense = images(0)
    seeds = np.arange(10, 16)
    save_samples(tmp_path / "dense.npz", dense[::-1], seeds[::-1], {"sampler": "ddim"})  # another order
    model = noisy(dense, 10.0)
    model[2] = dense[2]  # one image the model left unchanged
    save_samples(tmp_path / "model.npz", model, seeds, {"sampler": "ddim", "reuse_plan": "abc"})
    consistency(tmp_path / "model.npz", tmp_path / "dense.npz", tmp_path / "c.json", batch_size=4, threads=1)
    result = json.loads((tmp_path / "c.json").read_text())
    ssim, psnr = image_metrics(model, dense)
    assert result["ssim"] == pytest.approx(ssim.mean()) and result["identical_images"] == 1
    assert result["psnr"] == pytest.approx(np.delete(psnr, 2).mean()) and result["num_images"] == 6
    assert result["sampled_with"] == {"sampler": "ddim", "reuse_plan": "abc"}
    assert (result["first_seed"], result["last_seed"]) == (10, 15)
    save_samples(tmp_path / "other.npz", model, seeds + 3, {})
    with pytest.raises(StageError, match=r"other\.npz: 3 of its 6 seeds \(first 16\) are not among the seeds of "
                                         r".*dense\.npz"):
        consistency(tmp_path / "other.npz", tmp_path / "dense.npz", tmp_path / "d.json", batch_size=4, threads=1)
    assert not (tmp_path / "d.json").exists()


def test_ssim_and_psnr_columns_only_where_models_were_compared(tmp_path):
    """The experiment's table reads each model's consistency JSON (rules/common.smk table_rows gives
    it for every model but the dense one): SSIM and PSNR columns there, blank for the dense row, and
    no such columns in a table without them (catches another file's number in the column, or empty
    columns in every table)."""
    from igsm.tables import build_rows, write_tables
    from test_clip_score import header_and_row, table_files

    rows = [table_files(tmp_path / "c", "dense", 50.0), table_files(tmp_path / "c", "untrained", 90.0)]
    (tmp_path / "untrained.json").write_text(json.dumps({"ssim": 0.125, "psnr": 9.5, "num_images": 100}))
    rows[1]["consistency"] = str(tmp_path / "untrained.json")
    table = build_rows("unet", "digits", "", rows)
    assert table.set_index("model").ssim_to_dense.tolist()[1] == 0.125
    write_tables(table, markdown=tmp_path / "c.md")
    header, row = header_and_row(tmp_path / "c.md", "untrained")
    assert (row["SSIM to dense"], row["PSNR to dense (dB)"]) == ("0.12", "9.50")
    dense = next(line for line in (tmp_path / "c.md").read_text().splitlines()[2:] if "| dense " in line)
    assert dict(zip(header, (c.strip() for c in dense.strip("|").split("|"))))["SSIM to dense"] == "–"
    plain = build_rows("unet", "digits", "", [table_files(tmp_path / "p", "dense", 40.0)])
    assert "ssim_to_dense" not in plain.columns
    write_tables(plain, markdown=tmp_path / "p.md")
    assert "SSIM" not in (tmp_path / "p.md").read_text()
