"""The model families beside the demo's U-Net end to end through Snakemake, with tiny settings: a
U-ViT on the VP-SDE, and the conditional latent models (a DiT, an SD U-Net). Apart from
test_workflow.py, which shares the session's demo run with test_slurm.py in one test process, so
that these 5–9 minutes (measured in the full suite) run in another (tests/conftest.py schedules by module)."""

import json
import math

import pytest
import yaml
from PIL import Image

from conftest import REPO, snakemake_in
from igsm.sampling import load_samples

pytestmark = pytest.mark.slow


def tiny_uvit_config():
    """A tiny U-ViT on the VP-SDE through every stage: dense training, Diff-Pruning, IGSM
    finetuning, Euler–Maruyama sampling and FID, on the digits, in well under a minute of jobs."""
    return {
        "datasets": {"digits": {"source": "sklearn-digits", "image_size": 16}},
        "objectives": {"igsm": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}},
        "experiments": {"digits_uvit": {
            "dataset": "digits",
            "architecture": {"family": "uvit", "img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 16,
                             "depth": 2, "num_heads": 2},
            "diffusion": {"process": "vpsde"},
            "dense": {"training": {"num_steps": 20, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3,
                                   "log_every": 10, "checkpoint_every": 10}},
            "prune": {"criterion": "diff-pruning", "num_images": 8},
            "finetune": {"runs": [{"channel_ratio": 0.5, "objectives": ["igsm"]}],
                         "training": {"num_steps": 4, "batch_size": 8, "optimizer": "adamw",
                                      "log_every": 2, "checkpoint_every": 2}},
            "sample": {"sampler": "euler-maruyama", "num_images": 8, "num_steps": 10, "batch_size": 8},
            "fid": {"mode": "clean", "num_reference": 16},
        }},
    }


def test_tiny_uvit_runs_through_the_workflow(tmp_path):
    workdir = tmp_path / "uvit"
    workdir.mkdir()
    # The FIDs, not the tables: the efficiency and table jobs are family-blind and cost time.
    targets = [f"results/fid/digits_uvit/{v}.json" for v in ("dense", "diff-pruning-cr0.5/igsm")]
    proc = snakemake_in(workdir, tiny_uvit_config(), *targets)
    assert proc.returncode == 0, proc.stdout[-8000:]
    results = workdir / "results"
    report = json.loads((results / "prune/digits_uvit/diff-pruning-cr0.5/report.json").read_text())
    assert report["pruned_params"] < report["dense_params"] and report["num_gradient_steps"] > 0
    records = [json.loads(line) for line in
               (results / "finetune/digits_uvit/diff-pruning-cr0.5/igsm/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "np", "kd", "jm2"))
    for variant in ("dense", "diff-pruning-cr0.5/igsm"):
        score = json.loads((results / f"fid/digits_uvit/{variant}.json").read_text())
        assert math.isfinite(score["fid"]) and score["sampler"] == "euler-maruyama"
        assert score["sampler_kwargs"]["num_steps"] == 10


def tiny_latent_config(workdir):
    """config/latent.yaml (a class-conditional DiT and a caption-conditional SD U-Net on a tiny
    autoencoder's latents of the digits; config/conditional.yaml's pixel models share their
    conditioning path) at a few steps a stage, with the tiny text encoder and CLIP model its README
    commands write."""
    from igsm.clip_score import save_tiny_clip
    from igsm.conditioning import save_tiny_text_encoder

    config = yaml.safe_load((REPO / "config" / "latent.yaml").read_text())
    text = config["experiments"]["digits_text_sd"]["conditioning"]
    # 16 tokens, not CLIP's 77 (the README command's): the prompts fit, and cross-attention costs less.
    save_tiny_text_encoder(workdir / text["text_encoder"], [" ".join(text["prompts"])], hidden_size=32, max_length=16)
    save_tiny_clip(workdir / config["experiments"]["digits_text_sd"]["clip_score"]["model"], [" ".join(text["prompts"])])
    for exp in config["experiments"].values():
        exp["dense"]["training"].update(num_steps=20, log_every=10, checkpoint_every=10)
        exp["finetune"]["training"].update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=2)
        exp["sample"].update(num_images=12, num_steps=4, batch_size=6)
        exp["fid"]["num_reference"] = 16
        exp["untrained_baseline"] = False
    return config


def test_conditional_and_latent_models_run_through_the_workflow(tmp_path):
    """Labels (or their captions) from the store to dense training, pruning, IGSM finetuning (student
    and teacher under the same condition), guided DDIM sampling and FID, for a DiT and an SD U-Net on
    an autoencoder's latents (encoded once, decoded before FID); the samples and the FID JSON say
    which conditioning and guidance made them."""
    experiments = ("digits_latent_dit", "digits_text_sd")
    # Block reuse of the guided latent samplers too: DiP-GO's table for the DiT, DeepCache's for SD.
    scored = {"digits_latent_dit": ("dense", "diff-pruning-cr0.3/igsm", "dense/reuse-dipgo-f0.6"),
              "digits_text_sd": ("diff-pruning-cr0.3/igsm", "dense/reuse-deepcache-f0.8")}
    targets = [f"results/fid/{exp}/{v}.json" for exp in experiments for v in scored[exp]]
    targets += ["results/efficiency/digits_text_sd/dense/reuse-deepcache-f0.8.json",
                "results/consistency/digits_latent_dit/diff-pruning-cr0.3/igsm.json",
                "results/consistency/digits_latent_dit/dense/reuse-dipgo-f0.6.json"]
    config = tiny_latent_config(tmp_path)
    config["experiments"]["digits_latent_dit"]["reuse"]["learn"]["train_steps"] = 3
    # At 4 sampler steps DeepCache's cheapest plan still runs 0.67 of SD's MACs (the outer blocks are big).
    config["experiments"]["digits_text_sd"]["reuse"]["mac_fractions"] = [0.8]
    proc = snakemake_in(tmp_path, config, *targets)
    assert proc.returncode == 0, proc.stdout[-8000:]
    results = tmp_path / "results"
    for exp in experiments:
        metrics = results / f"finetune/{exp}/diff-pruning-cr0.3/igsm/metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert all(math.isfinite(r[k]) for r in records for k in ("loss", "np", "kd", "jm2"))
        report = json.loads((results / f"prune/{exp}/diff-pruning-cr0.3/report.json").read_text())
        assert report["pruned_params"] < report["dense_params"] and report["num_gradient_steps"] > 0
        for variant in scored[exp]:
            score = json.loads((results / f"fid/{exp}/{variant}.json").read_text())
            assert math.isfinite(score["fid"]) and score["guidance_scale"] == 2.0
            if exp == "digits_text_sd":  # the prompts and the encoder that embedded them
                assert score["conditioning"]["kind"] == "text" and len(score["conditioning"]["prompts"]) == 10
                assert len(score["conditioning"]["text_encoder_sha256"]) == 64
            else:
                assert score["conditioning"]["kind"] == "class" and score["conditioning"]["null_label"] == 10
    # The DiT trained on the latent store and its samples are decoded images of the dataset's size.
    latents = json.loads((results / "data/digits/latents-tiny_vae/index.json").read_text())
    assert latents["dtype"] == "float16" and latents["image_shape"] == [8, 8, 4]
    summary = json.loads((results / "finetune/digits_latent_dit/diff-pruning-cr0.3/igsm/summary.json").read_text())
    assert summary["settings"]["latents"]["autoencoder"] == "results/autoencoders/tiny_vae/model"
    images, _, metadata = load_samples(results / "samples/digits_latent_dit/dense/samples.npz")
    assert images.shape == (12, 16, 16, 1) and metadata["latents"]["autoencoder"] == latents["latent"]["autoencoder"]
    # The reuse variants: the DiT's table learnt on its guided latent chains, SD's sampled with its
    # deepcache table; a guided step costs two network calls, on the one gate row.
    plan = json.loads((results / "reuse/digits_latent_dit/dense/reuse-dipgo-f0.6/plan.json").read_text())
    settings = plan["metadata"]["settings"]
    assert settings["guidance_scale"] == 2.0 and settings["latents"] and settings["conditioning"]["kind"] == "class"
    _, _, metadata = load_samples(results / "samples/digits_text_sd/dense/reuse-deepcache-f0.8/samples.npz")
    assert metadata["reuse_plan"] and metadata["guidance_scale"] == 2.0
    efficiency = json.loads((results / "efficiency/digits_text_sd/dense/reuse-deepcache-f0.8.json").read_text())
    assert efficiency["network_calls_per_step"] == 2 and efficiency["sampling_macs"] == pytest.approx(
        efficiency["macs"] * 4 * 2 * efficiency["reuse_mac_fraction"])
    # SSIM / PSNR to the dense model's images of the same seeds (decoded images, both guided)
    for variant in ("diff-pruning-cr0.3/igsm", "dense/reuse-dipgo-f0.6"):
        score = json.loads((results / f"consistency/digits_latent_dit/{variant}.json").read_text())
        assert score["num_images"] == 12 and -1 < score["ssim"] <= 1
        assert score["reference"] == "results/samples/digits_latent_dit/dense/samples.npz"
    pruned = json.loads((results / "prune/digits_latent_dit/diff-pruning-cr0.3/model/architecture.json").read_text())
    assert pruned["config"]["num_embeds_ada_norm"] == 10  # the label table kept whole
    # A column per class (per prompt): 12 images of 16 px (drawn 64 px, 1 px apart) in rows of 10.
    for exp in experiments:
        grid = results / f"samples/{exp}/{scored[exp][-1]}/grid.png"
        assert Image.open(grid).size == (10 * 65 + 1, 2 * 65 + 1)
