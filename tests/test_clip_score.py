"""CLIP score (issue 31, item 5): the stage's number against a brute-force computation with the same
tiny random CLIP, each image scored against the prompt of its seed (not of its place in the file),
the config errors naming their key, the table's CLIP column only where there are scores, and the
workflow's plan (config/latent.yaml, in a dry run): a job per scored model of the text experiment,
no other job changed."""

import json
import re

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, config_errors, demo_config, run_snakemake

PROMPTS = ["a photo of a cat", "a photo of a dog", "a drawing of a boat"]
SEEDS = np.arange(7, 14)  # not from 0: a prompt chosen by an image's place in the file differs from its seed's


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP written as `python -m igsm tiny-clip` writes it, and the model loaded."""
    from transformers import CLIPModel, CLIPProcessor

    from igsm.clip_score import save_tiny_clip

    folder = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", [" ".join(PROMPTS)], image_size=16, patch_size=4)
    return str(folder), CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def text_settings(model, batch_size=3, prompts=PROMPTS):
    return {"model": model, "batch_size": batch_size,
            "conditioning": {"kind": "text", "text_encoder": "unused-here", "prompts": list(prompts)}}


def write_samples(path, channels=3, prompts=PROMPTS, seeds=SEEDS):
    """A samples file as the sample stage writes it (images, their seeds, metadata)."""
    from igsm.sampling import save_samples

    images = np.random.default_rng(0).integers(0, 256, (len(seeds), 16, 16, channels), dtype=np.uint8)
    save_samples(path, images, seeds, {"conditioning": {"kind": "text", "prompts": list(prompts)},
                                       "guidance_scale": 2.0, "precision": "fp32", "sampler": "ddim"})
    return images


def brute_force(model, processor, images, prompts):
    """100 · cos of each image's and its prompt's CLIP embeddings, by hand with transformers: the
    towers, their projections, the normalisation (torchmetrics never called)."""
    rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    pixels = processor(images=[torch.from_numpy(i).permute(2, 0, 1) for i in rgb], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = []
        for prompt in prompts:  # one at a time: no padding at all
            tokens = processor.tokenizer([prompt], return_tensors="pt")
            text.append(model.text_projection(model.text_model(**tokens).pooler_output))
        text = torch.cat(text)
    cosine = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    return 100 * cosine.numpy().astype(np.float64)


def run_cli(*args):
    from click.testing import CliRunner

    from igsm.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("channels", [3, 1])
def test_score_equals_brute_force_with_each_seeds_prompt(tiny_clip, tmp_path, channels):
    # Bugs caught: prompts assigned by position instead of seed, a batch dropped or scored twice
    # (7 images in batches of 3), another mean, a greyscale image not given CLIP's three channels.
    folder, model, processor = tiny_clip
    samples, out = tmp_path / "samples.npz", tmp_path / "clip.json"
    images = write_samples(samples, channels)
    result = run_cli("clip-score", "--samples", samples, "--out", out, "--device", "cpu",
                     "--settings", json.dumps(text_settings(folder)))
    assert result.exit_code == 0, result.output
    score = json.loads(out.read_text())
    by_seed = brute_force(model, processor, images, [PROMPTS[s % len(PROMPTS)] for s in SEEDS])
    by_place = brute_force(model, processor, images, [PROMPTS[k % len(PROMPTS)] for k in range(len(SEEDS))])
    assert abs(by_seed.mean() - by_place.mean()) > 0.05  # the test can tell the two apart
    assert score["clip_score_unclipped"] == pytest.approx(by_seed.mean(), abs=1e-3)
    assert score["clip_score"] == pytest.approx(max(by_seed.mean(), 0.0), abs=1e-3)  # torchmetrics clips the mean
    assert score["num_images"] == len(SEEDS) and (score["first_seed"], score["last_seed"]) == (7, 13)
    from igsm.conditioning import weights_digest

    assert score["clip_model"] == folder and score["clip_model_sha256"] == weights_digest(model)
    assert score["torchmetrics"] == "1.9.0" and score["guidance_scale"] == 2.0 and score["image_precision"] == "fp32"
    assert score["prompts"]["kind"] == "text" and score["prompts"]["num_distinct"] == 3


def test_captions_experiment_scores_each_image_against_its_seeds_caption(tiny_clip, tmp_path):
    """Kind captions (each image prompted by a seeded subset of a store's captions): the stage asks
    the conditioning, which reads its prompt store; the brute force takes the subset by hand."""
    from igsm.data import write_store

    folder, model, processor = tiny_clip
    captions = [f"a photo of a {w}" for w in ("cat", "dog", "boat", "drawing", "photo")]
    store = write_store(tmp_path / "store", [(np.zeros((5, 4, 4, 3), np.uint8), np.arange(5), captions)],
                        extra={"captions_info": {"source": "test"}})
    conditioning = {"kind": "captions", "text_encoder": "unused-here", "num_prompts": 3, "prompt_seed": 7,
                    "prompt_store": str(store.directory)}
    samples, out = tmp_path / "samples.npz", tmp_path / "clip.json"
    from igsm.sampling import save_samples

    images = np.random.default_rng(1).integers(0, 256, (len(SEEDS), 16, 16, 3), dtype=np.uint8)
    save_samples(samples, images, SEEDS, {"conditioning": {"kind": "captions", "prompt_seed": 7, "prompts_dataset": ""}})
    result = run_cli("clip-score", "--samples", samples, "--out", out, "--device", "cpu", "--settings",
                     json.dumps({"model": folder, "batch_size": 4, "conditioning": conditioning}))
    assert result.exit_code == 0, result.output
    subset = [captions[i] for i in np.random.default_rng(7).permutation(5)[:3]]
    by_seed = brute_force(model, processor, images, [subset[s % 3] for s in SEEDS])
    score = json.loads(out.read_text())
    assert score["clip_score_unclipped"] == pytest.approx(by_seed.mean(), abs=1e-3)
    assert score["prompts"]["kind"] == "captions" and sorted(score["prompts"]["listed"]) == sorted(subset)


def test_sampling_prompts_are_the_prompts_sampling_condition_embeds(monkeypatch):
    """TextPrompts.sampling_prompts(seeds) names, for every seed, the prompt whose embedding row
    sampling_condition gives that seed's image (the table index instead of the embedding here)."""
    from igsm.conditioning import TextPrompts

    prompts = TextPrompts(text_encoder="unused", prompts=PROMPTS)
    monkeypatch.setattr(TextPrompts, "_embeddings", lambda self, index, device=None: index)
    seeds = np.array([7, 3, 5, 0, 11, 2])
    rows = prompts.sampling_condition(seeds).tolist()
    assert prompts.sampling_prompts(seeds) == [PROMPTS[r] for r in rows] == [PROMPTS[1], PROMPTS[0], PROMPTS[2],
                                                                             PROMPTS[0], PROMPTS[2], PROMPTS[2]]


def test_stage_refuses_conditionings_without_prompts_and_stale_samples(tmp_path):
    """Checked before any model is loaded (the CLIP folder does not exist), naming what is wrong."""
    samples = tmp_path / "samples.npz"
    write_samples(samples)
    labels = {"model": "./nowhere", "batch_size": 4, "conditioning": {"kind": "class", "num_classes": 10}}
    result = run_cli("clip-score", "--samples", samples, "--out", tmp_path / "a.json", "--settings", json.dumps(labels))
    assert result.exit_code != 0 and "conditioning.kind 'class' gives its images no prompts" in result.output
    other = text_settings("./nowhere", prompts=["a photo of a bird", *PROMPTS[1:]])
    result = run_cli("clip-score", "--samples", samples, "--out", tmp_path / "b.json", "--settings", json.dumps(other))
    assert result.exit_code != 0 and f"{samples}: sampled with another conditioning.prompts than the config" in result.output
    result = run_cli("clip-score", "--samples", samples, "--out", tmp_path / "c.json",
                     "--settings", json.dumps(text_settings("./nowhere")))
    assert result.exit_code != 0 and "clip_score.model: local folder ./nowhere does not exist" in result.output
    assert not any((tmp_path / name).exists() for name in ("a.json", "b.json", "c.json"))


# ---- config checks ----------------------------------------------------------------------------


def text_experiment(c, tmp_path):
    """digits_unet as a text-conditioned SD U-Net (a local encoder folder: only its config.json is read)."""
    encoder = tmp_path / "text_encoder"
    encoder.mkdir(exist_ok=True)
    (encoder / "config.json").write_text(json.dumps({"hidden_size": 32}))
    exp = c["experiments"]["digits_unet"]
    exp["conditioning"] = {"kind": "text", "text_encoder": str(encoder), "prompts": [str(i) for i in range(10)]}
    exp["architecture"] = {"family": "sd-unet", "sample_size": 16, "in_channels": 1, "out_channels": 1,
                           "block_out_channels": [16, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 4,
                           "cross_attention_dim": 32, "attention_head_dim": 4}
    exp["reuse"] = {"models": []}
    return exp


@pytest.mark.parametrize("conditioning", [None, {"kind": "class", "num_classes": 10}])
def test_clip_score_without_prompts_is_a_config_error_naming_the_key(conditioning):
    config = demo_config()
    exp = config["experiments"]["digits_unet"]
    if conditioning:
        exp["conditioning"] = conditioning
        exp["architecture"]["num_class_embeds"] = 11
        exp["reuse"] = {"models": []}
    exp["clip_score"] = {"enabled": True}
    errors = config_errors(config)
    kind = conditioning["kind"] if conditioning else "none"
    assert re.search(rf"^experiments\.digits_unet\.clip_score\.enabled: true, but conditioning\.kind '{kind}' gives "
                     "its images no prompts", errors, re.M), errors
    exp["clip_score"] = {"enabled": False, "model": "./anything"}  # a section that asks for nothing is fine
    assert config_errors(config) == ""


def test_text_experiment_takes_clip_score_and_a_missing_folder_is_named(tmp_path):
    config = demo_config()
    exp = text_experiment(config, tmp_path)
    exp["clip_score"] = {"enabled": True}  # the default model, a hub id: checked by its job
    assert config_errors(config) == ""
    exp["clip_score"] = {"enabled": True, "model": str(tmp_path / "clip")}
    assert re.search(r"^experiments\.digits_unet\.clip_score\.model: local folder .*/clip does not exist \(offline, "
                     r"`python -m igsm tiny-clip --out", config_errors(config), re.M)
    exp["clip_score"] = {"enabled": True, "batch_size": 0}
    assert "experiments.digits_unet.clip_score.batch_size" in config_errors(config)


# ---- tables ---------------------------------------------------------------------------------------


def table_files(tmp_path, variant, fid, clip=None):
    base = tmp_path / variant.replace("/", "__")
    base.mkdir(parents=True)
    files = {"variant.json": {"variant": variant, "kind": "dense", "criterion": "", "channel_ratio": None,
                              "objective": variant, "weights": None, "pruned": None},
             "fid.json": {"fid": fid, "num_images": 100, "mode": "clean"},
             "eff.json": {"params": 1e6, "macs": 1e9, "images_per_s": None}}
    if clip is not None:
        files["clip.json"] = {"clip_score": clip, "clip_model": "openai/clip-vit-large-patch14", "num_images": 100}
    for name, payload in files.items():
        (base / name).write_text(json.dumps(payload))
    row = {"metadata": str(base / "variant.json"), "fid": str(base / "fid.json"), "efficiency": str(base / "eff.json"),
           "summary": None, "prune_report": None}
    if clip is not None:  # rules/common.smk table_rows: the key only in experiments with CLIP scores
        row["clip_score"] = str(base / "clip.json")
    return row


def header_and_row(markdown, model):
    lines = markdown.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = next([c.strip() for c in line.strip("|").split("|")] for line in lines if f" {model} " in line)
    return header, dict(zip(header, cells))


def test_clip_column_only_in_tables_with_scores(tmp_path):
    # Bugs caught: an empty CLIP column in every table, the score shown without its CLIP model, or
    # another file's number in the column.
    import pandas as pd

    from igsm.tables import build_rows, write_tables

    text = build_rows("text_sd", "digits", "", [table_files(tmp_path / "t", "dense", 50.0, clip=31.25),
                                                 table_files(tmp_path / "t", "untrained", 90.0, clip=18.5)])
    plain = build_rows("unet", "digits", "", [table_files(tmp_path / "p", "dense", 40.0)])
    assert "clip_score" not in plain.columns and text.set_index("model").clip_score.tolist() == [31.25, 18.5]
    for name, table in (("text", text), ("plain", plain)):
        write_tables(table, markdown=tmp_path / f"{name}.md", csv=tmp_path / f"{name}.csv")
    header, row = header_and_row(tmp_path / "text.md", "dense")
    assert (row["FID"], row["CLIP (openai/clip-vit-large-patch14)"]) == ("50.00", "31.25")
    header, _ = header_and_row(tmp_path / "plain.md", "dense")
    assert not any("CLIP" in column for column in header)
    assert "clip_score" not in pd.read_csv(tmp_path / "plain.csv").columns
    # The combined table (scripts/combine_tables.py: the experiments' CSVs concatenated): the column
    # is there for the text experiment's rows, blank for the others.
    combined = pd.concat([pd.read_csv(tmp_path / f"{n}.csv") for n in ("plain", "text")], ignore_index=True)
    write_tables(combined, markdown=tmp_path / "all.md")
    _, row = header_and_row(tmp_path / "all.md", "untrained")
    assert row["CLIP (openai/clip-vit-large-patch14)"] == "18.50"
    write_tables(pd.read_csv(tmp_path / "plain.csv"), markdown=tmp_path / "all_plain.md")
    assert "CLIP" not in (tmp_path / "all_plain.md").read_text()


# ---- the workflow's plan --------------------------------------------------------------------------


def planned_jobs(output):
    """{(rule, output): (its input line, its shell command)} of a dry run with -p."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):.*?\n\s+output: ([^\n]+)", block, re.S)
        if match:
            found = [re.search(pattern, block) for pattern in (r"\n\s+input: ([^\n]+)", r"Shell command: ([^\n]+)")]
            jobs[match.group(1), match.group(2)] = tuple(f.group(1) if f else "" for f in found)
    return jobs


def test_latent_config_plans_clip_scores_for_the_text_experiment_only(tmp_path):
    """config/latent.yaml with its README commands' tiny text encoder and CLIP folder: a clip_score
    job per scored model of digits_text_sd reading that model's samples, none for the class-conditional
    DiT, the text experiment's table reading them; with clip_score disabled, every other job is
    planned with the same shell command (enabling it reruns nothing that exists)."""
    from igsm.conditioning import save_tiny_text_encoder

    config = yaml.safe_load((REPO / "config" / "latent.yaml").read_text())
    text = config["experiments"]["digits_text_sd"]
    save_tiny_text_encoder(tmp_path / text["conditioning"]["text_encoder"], [" ".join(text["conditioning"]["prompts"])])
    (tmp_path / text["clip_score"]["model"]).mkdir()  # a dry run reads no weights: the folder must exist

    def plan(name, settings):
        path = tmp_path / f"{name}.yaml"
        text["clip_score"] = settings
        path.write_text(yaml.safe_dump(config))
        proc = run_snakemake("all_tables", "-n", "-p", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                             "--configfile", str(path), check=False)
        assert proc.returncode == 0, proc.stdout[-4000:]
        return planned_jobs(proc.stdout)

    enabled = plan("enabled", dict(text["clip_score"]))
    disabled = plan("disabled", {"enabled": False})
    clip = {out: shell for (rule, out), (_, shell) in enabled.items() if rule == "clip_score"}
    variants = ["dense", "untrained", "diff-pruning-cr0.3/np", "diff-pruning-cr0.3/igsm"]
    variants += [f"dense/reuse-{method}-f0.6" for method in ("dipgo", "deepcache", "reuse-eps", "fewer-steps")]
    assert sorted(clip) == sorted(f"results/clip_score/digits_text_sd/{v}.json" for v in variants)
    for variant in variants:
        shell = clip[f"results/clip_score/digits_text_sd/{variant}.json"]
        assert f"--samples results/samples/digits_text_sd/{variant}/samples.npz" in shell
        settings = json.loads(re.search(r"--settings '(\{.*?\})'", shell).group(1))
        assert settings == {"model": "./clip", "batch_size": 100, "conditioning": text["conditioning"]}
    assert not any(rule == "clip_score" for rule, _ in disabled)
    tables = {out.split(",")[0]: inputs for (rule, out), (inputs, _) in enabled.items() if rule == "tables"}
    assert all(f"results/clip_score/digits_text_sd/{v}.json" in tables["results/tables/digits_text_sd.md"]
               for v in variants)
    assert "clip_score" not in tables["results/tables/digits_latent_dit.md"]
    # Every other job planned as it was: the same shell command, the same inputs but for the text
    # experiment's table, which also reads the CLIP files.
    others = {key: job for key, job in enabled.items() if key[0] != "clip_score"}
    assert set(others) == set(disabled)
    assert all(others[key][1] == disabled[key][1] for key in others)
    assert {key[1].split(",")[0] for key in others if others[key] != disabled[key]} == {"results/tables/digits_text_sd.md"}


def test_captions_experiment_plans_clip_scores_with_its_prompt_store(tmp_path):
    """config/latent_models.yaml's mscoco_sd15 (kind captions) with clip_score: its CLIP jobs read the
    prompt store its sample jobs read (an input, and the settings' prompt_store)."""
    from test_config import latent_models_config

    config = latent_models_config(tmp_path)
    config["experiments"]["mscoco_sd15"]["clip_score"] = {"enabled": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake("results/tables/mscoco_sd15.md", "-n", "-p", "-d", str(tmp_path), "-s", str(REPO / "Snakefile"),
                         "--configfile", str(path), check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    clip = {out: job for (rule, out), job in planned_jobs(proc.stdout).items() if rule == "clip_score"}
    assert len(clip) == 4 + 2 * 4  # dense, the three finetunes, and 4 reuse variants of dense and of IGSM
    for out, (inputs, shell) in clip.items():
        assert "results/data/coco2017_val/train" in inputs
        settings = json.loads(re.search(r"--settings '(\{.*?\})'", shell).group(1))
        assert settings["conditioning"]["prompt_store"] == "results/data/coco2017_val/train"
        assert settings["model"] == "openai/clip-vit-large-patch14" and settings["conditioning"]["kind"] == "captions"
