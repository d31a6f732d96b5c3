"""Config validation and the workflow's shape: schema errors name the key, lint is clean, and the
paper config plans the full job graph."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO, run_snakemake, snakemake_executable


def demo_config():
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def dry_run(config, tmp_path, *targets):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_snakemake("-n", "--configfile", str(path), *targets, check=False)


def experiment(config):
    return config["experiments"]["digits_unet"]


def set_unknown_key(c):
    experiment(c)["finetune"]["trainig"] = {"num_steps": 5}


def set_wrong_type(c):
    experiment(c)["sample"]["num_images"] = "many"


def set_ratio_above_range(c):
    experiment(c)["finetune"]["runs"][0]["channel_ratio"] = 1.2


def set_negative_ratio(c):
    experiment(c)["finetune"]["runs"][0]["channel_ratio"] = -0.1


def set_unknown_objective(c):
    experiment(c)["finetune"]["runs"][0]["objectives"] = ["np", "igsmm"]


def set_unknown_loss_term(c):
    c["objectives"]["igsm"]["weights"]["jm3"] = 0.1


def set_unknown_criterion(c):
    experiment(c)["prune"]["criterion"] = "l1"


def set_unknown_efficiency_network(c):
    experiment(c)["efficiency"] = {"network": "fast"}


def set_unknown_dataset(c):
    experiment(c)["dataset"] = "digitz"


def set_teacher_of_unknown_experiment(c):
    experiment(c)["dense"] = {"from_experiment": "nope"}


def set_two_teachers(c):
    experiment(c)["dense"]["pretrained"] = "google/ddpm-cifar10-32"


def set_all_zero_weights(c):
    c["objectives"]["igsm"]["weights"] = {"np": 0.0, "jm2": 0}


def set_mixed_partials_with_jvp(c):
    c["objectives"]["igsm"].update(projection="jvp", jacobian_method="mixed_fd")


def set_jacobian_every_zero(c):
    c["objectives"]["igsm"]["jacobian_every"] = 0


def set_empty_jacobian_window(c):
    c["objectives"]["igsm"]["jacobian_timesteps"] = [100, 10]


def set_decreasing_diagnostic_edges(c):
    experiment(c)["finetune"]["training"]["diagnostic_timesteps"] = [100, 10]


def set_unknown_reuse_model(c):
    experiment(c)["reuse"]["models"] = ["diff-pruning-cr0.5/np"]


def set_reuse_with_compile(c):
    experiment(c)["sample"]["compile"] = True


def set_reuse_fraction_under_one_step(c):
    experiment(c)["reuse"]["mac_fractions"] = [0.01]


def set_fashion_mnist_odd_padding(c):
    c["datasets"]["digits"] = {"source": "fashion-mnist", "image_size": 31}


def set_escaping_experiment_name(c):
    c["experiments"]["../../escape"] = c["experiments"].pop("digits_unet")


def set_shell_objective_name(c):
    c["objectives"]["np$(touch pwned)"] = c["objectives"]["np"]


def set_dataset_name_with_space(c):
    c["datasets"]["my digits"] = c["datasets"].pop("digits")


def set_size_mismatch(c):
    experiment(c)["architecture"]["sample_size"] = 32


def set_channel_mismatch(c):
    experiment(c)["architecture"]["in_channels"] = 3


def set_default_channels_mismatch(c):
    del experiment(c)["architecture"]["out_channels"]  # diffusers' default: 3, the digits have 1


def set_batch_not_divisible_by_gpus(c):
    c.setdefault("resources", {})["finetune"] = {"gpu": 3}


def set_too_many_reference_images(c):
    experiment(c)["fid"]["num_reference"] = 5000


def set_missing_reference_statistics(c):
    experiment(c)["fid"]["reference_statistics"] = "no/such/fid_stats.npz"


def set_too_many_pruning_images(c):
    experiment(c)["prune"]["num_images"] = 2000


def set_missing_pretrained_folder(c):
    experiment(c)["dense"] = {"pretrained": "./no/such/ddpm"}


def set_image_folder_without_path(c):
    c["datasets"]["digits"] = {"source": "image-folder", "image_size": 16, "channels": 1}


def set_top_level_typo(c):
    c["experiment"] = c.pop("experiments")


def set_missing_plugin(c):
    c["plugins"] = ["my_plugins/family.py"]  # relative to the working directory (-d), where it is not


def set_name_with_final_newline(c):
    # `$` of a regular expression also matches before a final newline: "digits_unet\n" once passed.
    c["experiments"]["digits_unet\n"] = c["experiments"].pop("digits_unet")


def set_bad_sha256(c):
    c["datasets"]["digits"]["sha256"] = "abc"  # the string alternative of a oneOf: named as such


def set_experiment_named_all(c):
    c["experiments"]["all"] = c["experiments"].pop("digits_unet")  # results/tables/all.md is the combined table


def set_objective_named_like_a_paper_table(c):
    c["objectives"]["table1"] = c["objectives"].pop("np")
    experiment(c)["finetune"]["runs"][0]["objectives"] = ["table1", "igsm"]
    experiment(c)["reuse"]["models"] = []


def set_experiment_named_like_a_dataset_target(c):
    c["experiments"]["dataset_digits"] = c["experiments"].pop("digits_unet")


def set_dataset_named_like_a_rule(c):
    c["datasets"]["fid"] = c["datasets"].pop("digits")
    experiment(c)["dataset"] = "fid"


def set_samples_scaled_below_fid(c):
    c["scale"] = {"samples": 0.02}  # the demo's 50 images → 1: no covariance, a traceback after sampling


def set_unknown_process(c):
    experiment(c)["diffusion"] = {"process": "vp-sde"}


def set_unknown_dpm_solver_algorithm(c):
    experiment(c)["sample"].update(sampler="dpm-solver", algorithm="dpm++")


def set_compare_samplers_of_unknown_model(c):
    experiment(c)["compare_samplers"] = {"models": ["nope"], "settings": [{"sampler": "ddim", "num_steps": 5}]}


def set_compare_samplers_algorithm_on_ddim(c):
    experiment(c)["compare_samplers"] = {"models": ["dense"],
                                         "settings": [{"sampler": "ddim", "num_steps": 5, "algorithm": "dpmsolver"}]}


def set_compare_samplers_euler_maruyama_on_ddpm(c):
    experiment(c)["compare_samplers"] = {"models": ["dense"],
                                         "settings": [{"sampler": "euler-maruyama", "num_steps": 5}]}


def set_compare_samplers_unknown_sampler(c):
    experiment(c)["compare_samplers"] = {"models": ["dense"], "settings": [{"sampler": "dpm", "num_steps": 5}]}


def set_euler_maruyama_on_ddpm(c):
    experiment(c)["sample"]["sampler"] = "euler-maruyama"


def set_ddpm_key_on_vpsde(c):
    experiment(c)["diffusion"] = {"process": "vpsde", "beta_end": 0.02}


def set_pretrained_unet_on_vpsde(c):
    experiment(c).update(dense={"pretrained": "google/ddpm-cifar10-32"}, diffusion={"process": "vpsde"},
                         untrained_baseline=False)


def set_pretrained_uvit_on_ddpm(c):
    experiment(c).update(dense={"pretrained": "https://example.org/cifar10_uvit_small.pth"},
                         architecture={"family": "uvit", "img_size": 16, "patch_size": 4, "in_chans": 1,
                                       "embed_dim": 16, "depth": 2, "num_heads": 2}, untrained_baseline=False)


def set_uvit_channel_mismatch(c):
    experiment(c).update(architecture={"family": "uvit", "img_size": 16, "patch_size": 4, "in_chans": 3,
                                       "embed_dim": 16, "depth": 2, "num_heads": 2}, diffusion={"process": "vpsde"})


def set_class_conditioning(c, **architecture):
    experiment(c)["conditioning"] = {"kind": "class", "num_classes": 10}
    experiment(c)["architecture"].update(architecture)


def set_class_embeds_without_null_label(c):
    set_class_conditioning(c, num_class_embeds=10)


def set_class_embeds_unconditional(c):
    experiment(c)["architecture"]["num_class_embeds"] = 11


def set_guidance_without_condition(c):
    experiment(c)["sample"]["guidance_scale"] = 2.0


def set_class_on_uvit(c):
    set_uvit_channel_mismatch(c)
    experiment(c)["architecture"]["in_chans"] = 1
    experiment(c)["conditioning"] = {"kind": "class", "num_classes": 10}


def set_unknown_conditioning_kind(c):
    experiment(c)["conditioning"] = {"kind": "audio"}


TINY_VAE = {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16], "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 4}


def set_latent(c, **architecture):
    """digits_unet as a latent experiment of a tiny autoencoder (16×16×1 → 8×8×4)."""
    c["autoencoders"] = {"vae": {"architecture": dict(TINY_VAE)}}
    experiment(c)["autoencoder"] = "vae"
    experiment(c)["architecture"].update({"sample_size": 8, "in_channels": 4, "out_channels": 4, **architecture})


def set_unknown_autoencoder(c):
    set_latent(c)
    experiment(c)["autoencoder"] = "sd_vae"


def set_autoencoder_given_twice(c):
    set_latent(c)
    c["autoencoders"]["vae"]["pretrained"] = "stabilityai/sd-vae-ft-ema"


def set_latent_network_of_image_size(c):
    set_latent(c, sample_size=16)


def set_latent_network_of_image_channels(c):
    set_latent(c, in_channels=1)


def set_latent_hflip(c):
    set_latent(c)
    experiment(c)["finetune"]["training"]["hflip"] = True


def set_autoencoder_not_dividing_the_side(c):
    set_latent(c)
    c["autoencoders"]["vae"]["architecture"]["block_out_channels"] = [8, 16, 16, 16, 16, 16]
    c["autoencoders"]["vae"]["architecture"]["down_block_types"] = ["DownEncoderBlock2D"] * 6
    c["autoencoders"]["vae"]["architecture"]["up_block_types"] = ["UpDecoderBlock2D"] * 6


def set_pretrained_sd_on_linear_betas(c):
    """A pretrained SD U-Net finetuned on the paper's linear β: its checkpoints learned another."""
    experiment(c)["architecture"] = {"family": "sd-unet"}
    experiment(c)["dense"] = {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    experiment(c)["conditioning"] = {"kind": "text", "text_encoder": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                     "prompts": [str(i) for i in range(10)]}
    experiment(c)["untrained_baseline"] = False


def set_captions_on_the_digits(c):
    """Each image's own caption from a dataset that stores none (the digits), prompted by another
    that does not exist."""
    set_pretrained_sd_on_linear_betas(c)
    experiment(c)["diffusion"] = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    experiment(c)["conditioning"] = {"kind": "captions", "text_encoder": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                     "prompts_dataset": "coco_val"}


def set_reference_dataset_of_another_size(c):
    c["datasets"]["digits8"] = {"source": "sklearn-digits", "image_size": 8}
    experiment(c)["fid"]["reference_dataset"] = "digits8"


@pytest.mark.parametrize("mutate, expected", [
    (set_reference_dataset_of_another_size, r"experiments\.digits_unet\.fid\.reference_dataset: dataset 'digits8' has "
                                            r"image_size 8, the experiment's dataset 'digits' 16"),
    (set_captions_on_the_digits, r"experiments\.digits_unet\.dataset: dataset 'digits' \(source sklearn-digits\) "
                                 r"stores no captions, but conditioning\.kind captions reads them"),
    (set_captions_on_the_digits, r"experiments\.digits_unet\.conditioning\.prompts_dataset: unknown dataset "
                                 r"'coco_val'"),
    (set_pretrained_sd_on_linear_betas, r"experiments\.digits_unet\.diffusion\.beta_schedule: 'linear', but the SD "
                                        r"U-Net's released checkpoints learned beta_schedule 'scaled_linear'"),
    (set_unknown_autoencoder, r"experiments\.digits_unet\.autoencoder: unknown autoencoder 'sd_vae'; defined under "
                              r"'autoencoders': \['vae'\]"),
    (set_autoencoder_given_twice, r"autoencoders\.vae: give exactly one of 'pretrained' or 'architecture'"),
    (set_latent_network_of_image_size, r"experiments\.digits_unet\.architecture\.sample_size: 16, but the latent space "
                                       r"of autoencoder 'vae' on dataset 'digits' is 8×8"),
    (set_latent_network_of_image_channels, r"experiments\.digits_unet\.architecture\.in_channels: 1, but the latent "
                                           r"space of autoencoder 'vae' on dataset 'digits' has 4 channel"),
    (set_latent_hflip, r"experiments\.digits_unet\.finetune\.training\.hflip: a latent experiment"),
    (set_autoencoder_not_dividing_the_side, r"experiments\.digits_unet\.autoencoder: 'vae' divides the image side by 32, "
                                            r"which does not divide datasets\.digits\.image_size 16"),
])
def test_config_check_names_the_key(mutate, expected):
    """The checks of latent experiments and pretrained families, in process (igsm.config, as the
    Snakefile calls it: that a failing check stops the workflow before any job, one line per error,
    the cases above show through Snakemake)."""
    from igsm.config import ConfigError, check_config, validate_schema

    config = demo_config()
    mutate(config)
    with pytest.raises(ConfigError) as raised:
        validate_schema(config)
        check_config(config)
    assert re.search(expected, str(raised.value), re.M), str(raised.value)


@pytest.mark.parametrize("mutate, expected", [
    (set_class_embeds_without_null_label, r"experiments\.digits_unet\.architecture\.num_class_embeds: 10, but "
                                          r"conditioning\.num_classes 10 needs 11"),
    (set_class_embeds_unconditional, r"experiments\.digits_unet\.architecture\.num_class_embeds: 11 makes a "
                                     r"class-conditional U-Net, but experiments\.digits_unet\.conditioning\.kind is none"),
    (set_guidance_without_condition, r"experiments\.digits_unet\.sample\.guidance_scale: 2\.0, but the experiment "
                                     r"is unconditional"),
    (set_class_on_uvit, r"experiments\.digits_unet\.architecture\.num_classes: unset, but conditioning\.num_classes "
                        r"10 needs 11"),
    (set_unknown_conditioning_kind, r"experiments\.digits_unet\.conditioning\.kind: 'audio' is not one of none, class, text"),
    (set_unknown_process, r"experiments\.digits_unet\.diffusion\.process: 'vp-sde' is not one of ddpm, vpsde"),
    (set_euler_maruyama_on_ddpm, r"experiments\.digits_unet\.diffusion\.process: 'ddpm', but sample\.sampler "
                                 r"'euler-maruyama' integrates the VP-SDE"),
    (set_unknown_dpm_solver_algorithm, r"experiments\.digits_unet\.sample\.algorithm: 'dpm\+\+' is not one of "
                                       r"dpmsolver\+\+, dpmsolver"),
    (set_compare_samplers_of_unknown_model, r"experiments\.digits_unet\.compare_samplers\.models: 'nope' is not a "
                                            r"scored model of this experiment; choose among \['dense', 'untrained'"),
    (set_compare_samplers_algorithm_on_ddim, r"experiments\.digits_unet\.compare_samplers\.settings\[0\]\.algorithm: "
                                             r"only sampler dpm-solver takes an algorithm, not 'ddim'"),
    (set_compare_samplers_euler_maruyama_on_ddpm, r"experiments\.digits_unet\.compare_samplers\.settings\[0\]\."
                                                  r"sampler: 'euler-maruyama' integrates the VP-SDE"),
    (set_compare_samplers_unknown_sampler, r"experiments\.digits_unet\.compare_samplers\.settings\[0\]\.sampler: "
                                           r"'dpm' is not one of ddim, euler-maruyama, dpm-solver"),
    (set_ddpm_key_on_vpsde, r"experiments\.digits_unet\.diffusion\.beta_end: a key of process 'ddpm'"),
    (set_pretrained_unet_on_vpsde, r"experiments\.digits_unet\.diffusion\.process: 'vpsde', but pretrained "
                                   r"diffusers U-Nets are DDPM models"),
    (set_pretrained_uvit_on_ddpm, r"experiments\.digits_unet\.diffusion\.process: 'ddpm', but U-ViT's released "
                                  r"checkpoints were trained on the VP-SDE"),
    (set_uvit_channel_mismatch, r"experiments\.digits_unet\.architecture\.in_chans: 3, but dataset 'digits'"),
    (set_unknown_key, r"experiments\.digits_unet\.finetune\.trainig: unknown key; did you mean 'training'\? "
                      r"valid here: runs, training"),
    (set_top_level_typo, r"experiment: unknown key; did you mean 'experiments'\? valid here: datasets, objectives, "
                         r"autoencoders, experiments, resources, plugins, publish, scale"),
    (set_wrong_type, r"experiments\.digits_unet\.sample\.num_images: 'many' is not of type 'integer'"),
    (set_ratio_above_range, r"experiments\.digits_unet\.finetune\.runs\[0\]\.channel_ratio: 1\.2 is greater than "
                            r"or equal to the maximum of 1"),
    (set_negative_ratio, r"experiments\.digits_unet\.finetune\.runs\[0\]\.channel_ratio: -0\.1 is less than the "
                         r"minimum of 0"),
    (set_unknown_objective, r"finetune\.runs\[0\]\.objectives: unknown objective 'igsmm'"),
    (set_unknown_loss_term, r"objectives\.igsm\.weights\.jm3: unknown key; did you mean 'jm2'\?"),
    (set_unknown_criterion, r"experiments\.digits_unet\.prune\.criterion: 'l1' is not one of diff-pruning, taylor, "
                            r"magnitude, random, reinit, gradient-flow"),
    (set_unknown_dataset, r"experiments\.digits_unet\.dataset: unknown dataset 'digitz'"),
    (set_unknown_efficiency_network, r"experiments\.digits_unet\.efficiency\.network: 'fast' is not one of eager, "
                                     r"as-sampled$"),
    (set_teacher_of_unknown_experiment, r"experiments\.digits_unet\.dense\.from_experiment: 'nope'"),
    (set_two_teachers, r"experiments\.digits_unet\.dense: give exactly one of"),
    (set_all_zero_weights, r"objectives\.igsm\.weights: every weight is 0"),
    (set_mixed_partials_with_jvp, r"objectives\.igsm\.jacobian_method: 'mixed_fd' needs projection 'vjp'"),
    (set_jacobian_every_zero, r"objectives\.igsm\.jacobian_every: 0 is less than the minimum of 1"),
    (set_empty_jacobian_window, r"objectives\.igsm\.jacobian_timesteps: \[100, 10\] is not a range"),
    (set_decreasing_diagnostic_edges, r"experiments\.digits_unet\.finetune\.training\.diagnostic_timesteps: "
                                      r"\[100, 10\] is not increasing"),
    (set_unknown_reuse_model, r"experiments\.digits_unet\.reuse\.models: 'diff-pruning-cr0\.5/np' is not a "
                              r"scored model of this experiment; choose among \['dense', 'diff-pruning-cr0\.3/np'"),
    (set_reuse_with_compile, r"experiments\.digits_unet\.sample\.compile: block reuse"),
    (set_reuse_fraction_under_one_step, r"experiments\.digits_unet\.reuse\.mac_fractions: 0\.01 of 20 sampler steps"),
    (set_fashion_mnist_odd_padding, r"datasets\.digits\.image_size"),
    (set_escaping_experiment_name, r"experiments: '\.\./\.\./escape' is not a valid name\. Names become folder "
                                   r"names and wildcards: letters, digits"),
    (set_shell_objective_name, r"objectives: 'np\$\(touch pwned\)' is not a valid name"),
    (set_dataset_name_with_space, r"datasets: 'my digits' is not a valid name"),
    (set_name_with_final_newline, r"experiments: 'digits_unet\\n' is not a valid name"),
    (set_bad_sha256, r"datasets\.digits\.sha256: 'abc' does not match '\^\[0-9a-fA-F\]\{64\}"),
    (set_experiment_named_all, r"experiments\.all: 'all' is already the combined table's name "
                               r"\(results/tables/all\.md\); choose another name"),
    (set_objective_named_like_a_paper_table, r"objectives\.table1: 'table1' is already the target of the "
                                             r"paper's table1"),
    (set_experiment_named_like_a_dataset_target, r"experiments\.dataset_digits: 'dataset_digits' is already "
                                                 r"the target of datasets\.digits"),
    (set_dataset_named_like_a_rule, r"datasets\.fid: 'fid' is already the name of the workflow's rule fid"),
    (set_samples_scaled_below_fid, r"scale\.samples: 0\.02 leaves experiments\.digits_unet\.sample\.num_images "
                                   r"at 1 image\(s\); its FID needs at least 2"),
    (set_size_mismatch, r"experiments\.digits_unet\.architecture\.sample_size: 32, but datasets\.digits\.image_size is 16"),
    (set_channel_mismatch, r"experiments\.digits_unet\.architecture\.in_channels: 3, but dataset 'digits'"),
    (set_default_channels_mismatch, r"experiments\.digits_unet\.architecture\.out_channels: 3"),
    (set_batch_not_divisible_by_gpus, r"experiments\.digits_unet\.finetune\.training\.batch_size: 64 does not split over the 3"),
    (set_too_many_reference_images, r"experiments\.digits_unet\.fid\.num_reference: 5000 images asked, dataset 'digits' holds 1797"),
    (set_too_many_pruning_images, r"experiments\.digits_unet\.prune\.num_images: 2000 images asked"),
    (set_missing_reference_statistics, r"experiments\.digits_unet\.fid\.reference_statistics: no/such/fid_stats\.npz is not an existing \.npz"),
    (set_missing_pretrained_folder, r"experiments\.digits_unet\.dense\.pretrained: local folder \./no/such/ddpm does not exist"),
    (set_image_folder_without_path, r"datasets\.digits\.path"),
    (set_missing_plugin, r"^plugins\[0\]: plugin file my_plugins/family\.py does not exist \(looked for .*/my_plugins/"),
])
def test_bad_config_is_rejected_naming_the_key(mutate, expected, tmp_path):
    """A real run (not a dry run) in an empty folder: it must stop before any job, with the key."""
    config = demo_config()
    mutate(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake("-d", str(tmp_path), "--cores", "1", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    assert re.search(expected, proc.stdout, re.M), proc.stdout[-3000:]
    # A few lines, none of them jsonschema's report (the schema, the whole value).
    assert len(proc.stdout.strip().splitlines()) <= 5, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "Failed validating" not in proc.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "pwned").exists()


def test_demo_config_is_valid(tmp_path):
    proc = dry_run(demo_config(), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_conditional_config_plans_its_pixel_models(tmp_path):
    """config/conditional.yaml (the pixel-space class-conditional U-Net and DiT; the workflow test
    runs config/latent.yaml's latent ones through the same conditioning path): every stage planned,
    labels and guidance in the jobs' settings."""
    config = yaml.safe_load((REPO / "config" / "conditional.yaml").read_text())
    proc = dry_run(config, tmp_path, "-p", "all_tables")
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = job_counts(proc.stdout)
    assert counts["finetune"] == 4 and counts["dense_trained"] == 2 and counts["prune"] == 2
    jobs = planned(proc.stdout)
    assert all('"num_classes": 10' in b for b in jobs["finetune"] + jobs["prune"] + jobs["sample"])
    assert all('"guidance_scale": 2.0' in b for b in jobs["sample"])


def test_supplied_reference_statistics_replace_the_reference_job(tmp_path):
    """fid.reference_statistics: no Inception statistics of the training images are made, and every
    fid job reads the user's file."""
    import numpy as np

    supplied = tmp_path / "fid_stats_published.npz"
    np.savez(supplied, mu=np.zeros(4), sigma=np.eye(4))
    config = demo_config()
    experiment(config)["fid"]["reference_statistics"] = str(supplied)
    experiment(config)["prdc"] = {"enabled": False}  # the demo's PRDC needs the reference images' features
    proc = dry_run(config, tmp_path, "--printshellcmds")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "rule fid_reference" not in proc.stdout
    assert proc.stdout.count(f"--reference {supplied}") == job_counts(proc.stdout)["fid"] > 0


def test_scale_shrinks_every_experiment(tmp_path):
    """`scale`: every training's num_steps and every sample count shrink by its factors (the jobs'
    settings say so), rounded and at least 1; a factor outside (0, 1] is refused naming the key."""
    from igsm.config import apply_scale

    config = demo_config()
    config["scale"] = {"steps": 0.01, "samples": 0.2}  # 10 images: PRDC's k = 5 needs 7
    exp = experiment(config)
    dense_steps, finetune_steps = exp["dense"]["training"]["num_steps"], exp["finetune"]["training"]["num_steps"]
    images = exp["sample"]["num_images"]
    scaled = yaml.safe_load(yaml.safe_dump(config))
    apply_scale(scaled)
    s = experiment(scaled)
    assert s["dense"]["training"]["num_steps"] == max(1, round(dense_steps * 0.01))
    assert s["finetune"]["training"]["num_steps"] == max(1, round(finetune_steps * 0.01))
    assert s["sample"]["num_images"] == max(1, round(images * 0.2))
    proc = dry_run(config, tmp_path, "--printshellcmds")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f'"num_steps": {s["finetune"]["training"]["num_steps"]},' in proc.stdout
    assert f"--num-images {s['sample']['num_images']} " in proc.stdout
    config["scale"] = {"steps": 0}
    proc = dry_run(config, tmp_path)
    assert proc.returncode != 0 and "scale.steps: 0 is less than or equal to the minimum of 0" in proc.stdout


def test_scale_gives_each_experiment_its_own_defaults(tmp_path):
    """Two experiments that leave out their `sample` section each get the default count times
    scale.samples, once. Catches the schema's default filled in as one shared object, which `scale`
    then shrank once per experiment (50,000 × 0.5 × 0.5 = 12,500 images for both)."""
    config = demo_config()
    experiment(config).update(reuse={"models": []})
    del experiment(config)["sample"]
    config["experiments"]["second"] = yaml.safe_load(yaml.safe_dump(experiment(config)))
    config["scale"] = {"samples": 0.5}
    proc = dry_run(config, tmp_path, "--printshellcmds")
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = set(re.findall(r"--num-images (\d+) ", proc.stdout))
    assert counts == {"25000"}, counts


def test_every_schema_error_at_once_one_line_each_sorted_by_key(tmp_path):
    """Five mistakes at every depth: one run names all five (not one per run), each on one line
    that starts with its dotted key, sorted by key, and no jsonschema report; IGSM_CONFIG_DETAIL=1
    (check-config here) adds that report to each. Catches errors reported one at a time, a
    misspelled key reported as its parent's path in subscript form, the schema dumped."""
    config = demo_config()
    config["experiment"] = {}
    experiment(config)["prune"]["criterion"] = "l1"
    experiment(config)["finetune"]["trainig"] = {"num_steps": 5}
    experiment(config)["sample"]["num_images"] = "many"
    config["objectives"]["np\n"] = {"weights": {"np": 1.0}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake("-d", str(tmp_path), "--cores", "1", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    lines = proc.stdout.strip().splitlines()
    keys = ["experiment:", "experiments.digits_unet.finetune.trainig:", "experiments.digits_unet.prune.criterion:",
            "experiments.digits_unet.sample.num_images:", "objectives:"]
    assert [line.split(" ", 1)[0] for line in lines[1:-2]] == keys, proc.stdout
    assert lines[-2].startswith("(5 error(s); schemas/config.schema.yaml describes every key; IGSM_CONFIG_DETAIL=1")
    assert "Failed validating" not in proc.stdout and not (tmp_path / "results").exists()
    detailed = subprocess.run([sys.executable, "-m", "igsm", "check-config", str(path)], cwd=REPO, text=True,
                              capture_output=True, env={**os.environ, "IGSM_CONFIG_DETAIL": "1"})
    assert detailed.returncode != 0 and detailed.stderr.count("Failed validating") == 5, detailed.stderr[-3000:]


DUPLICATES = """\
datasets:
  digits: {source: sklearn-digits, image_size: 16}
objectives:
  np: {weights: {np: 1.0}}
experiments:
  base: &base
    dataset: digits
    architecture: {sample_size: 16, in_channels: 1, out_channels: 1, norm_num_groups: 4}
    dense:
      training: {num_steps: 10}
    prune:
      criterion: taylor
      thr: 0.1
      criterion: random
  other:
    <<: *base
    dataset: digits
experiments:
  base: {dataset: digits}
"""


def test_duplicate_keys_are_refused_naming_file_line_and_key(tmp_path):
    """A key given twice in one mapping (YAML keeps the last without a word; check-config once said
    valid) stops the run and check-config, naming the file, the line and the key of each; keys a
    merge (<<: *base) brings in may be overridden, as config/fashion_mnist.yaml does."""
    path = tmp_path / "config.yaml"
    path.write_text(DUPLICATES)
    expected = [f"{path}, line 14: experiments.base.prune.criterion given twice in one mapping (first at line 12)",
                f"{path}, line 18: experiments given twice in one mapping (first at line 5)"]
    proc = run_snakemake("-d", str(tmp_path), "--cores", "1", "--configfile", str(path), check=False)
    assert proc.returncode != 0 and all(line in proc.stdout for line in expected), proc.stdout[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 4 and not (tmp_path / "results").exists()
    check = subprocess.run([sys.executable, "-m", "igsm", "check-config", str(path)], cwd=REPO, text=True,
                           capture_output=True)
    assert check.returncode != 0 and all(line in check.stderr for line in expected), check.stderr
    merged = subprocess.run([sys.executable, "-m", "igsm", "check-config", "config/fashion_mnist.yaml"], cwd=REPO,
                            text=True, capture_output=True)
    assert merged.returncode == 0, merged.stderr


def alias_bomb(mappings: bool) -> str:
    """Under 1 kB of YAML whose aliases expand to 9^10 ≈ 3.5e9 values: lists of lists, or mappings
    of mappings."""
    def level(i):
        items = ["1"] * 9 if i == 0 else [f"*a{i - 1}"] * 9
        if mappings:
            return "{" + ", ".join(f"k{j}: {item}" for j, item in enumerate(items)) + "}"
        return "[" + ", ".join(items) + "]"

    return "".join(f"a{i}: &a{i} {level(i)}\n" for i in range(10)) + "experiments: {}\n"


PEAK_MEMORY = """\
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
print(proc.stdout)
print("peak MB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
sys.exit(proc.returncode)
"""


def run_with_peak_memory(*argv):
    """(exit status, output, peak resident memory in MB) of a command (killed after 2 minutes)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY, *argv], cwd=REPO, text=True, capture_output=True,
                          timeout=180)
    assert "peak MB" in proc.stdout, proc.stderr[-3000:]
    output, peak = proc.stdout.rsplit("peak MB", 1)
    return proc.returncode, output, int(peak)


@pytest.mark.slow
def test_alias_bombs_end_at_once_with_bounded_memory(tmp_path):
    """YAML alias bombs once hung check-config and snakemake (jsonschema, then its error report,
    walked 3.5e9 values) or called one valid: now both stop in seconds, under 2 GB (torch alone is
    ~0.7), naming the file. A self-referencing alias too. (A bomb of mappings given to snakemake
    itself: README, Snakemake's own merge expands it before the workflow starts.)"""
    lists, mappings, loop = tmp_path / "lists.yaml", tmp_path / "mappings.yaml", tmp_path / "loop.yaml"
    lists.write_text(alias_bomb(mappings=False))
    mappings.write_text(alias_bomb(mappings=True))
    loop.write_text("a: &a [1, *a]\nexperiments: {}\n")
    expected = "its YAML aliases (*name) expand to more than 100,000 values"
    status, output, peak = run_with_peak_memory(snakemake_executable(), "-d", str(tmp_path), "--cores", "1",
                                                "--configfile", str(lists))
    assert status != 0 and f"{lists}: {expected}" in output and peak < 2000, (peak, output[-3000:])
    assert not (tmp_path / "results").exists()
    for path in (lists, mappings):
        status, output, peak = run_with_peak_memory(sys.executable, "-m", "igsm", "check-config", str(path))
        assert status != 0 and f"{path}: {expected}" in output and peak < 2000, (peak, output[-3000:])
    status, output, _ = run_with_peak_memory(sys.executable, "-m", "igsm", "check-config", str(loop))
    assert status != 0 and f"{loop}, line 1: an alias refers to the list or mapping that contains it" in output


def test_every_rule_name_is_a_reserved_config_name():
    """igsm.config.WORKFLOW_RULES against the workflow's rules: catches a rule added without it,
    whose name an experiment could then take."""
    from igsm.config import target_names

    proc = run_snakemake("--list-rules", "--configfile", "config/demo.yaml")
    rules = set(proc.stdout.split())
    assert "all_tables" in rules and "dataset_digits" in rules and "table1" in rules
    assert rules <= set(target_names(demo_config())), rules - set(target_names(demo_config()))


def test_lint_has_no_findings():
    proc = run_snakemake("--lint", "--configfile", "config/demo.yaml", check=False)
    assert proc.returncode == 0 and "Congratulations" in proc.stdout, proc.stdout[-5000:]


def job_counts(output):
    table = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_paper_config_dry_run_lists_the_full_job_graph():
    """CIFAR-10 U-Net and U-ViT, CelebA U-ViT, LSUN church and bedroom U-Nets: one download and
    one FID reference per dataset (the two CIFAR-10 experiments share them), a pretrained teacher
    each (U-ViT's by its own rule), every run's prune and finetunes, each scored model's shards
    (U-ViT: 8 and 16, LSUN: 20) and FID."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert sorted(config["experiments"]) == ["bedroom_unet", "celeba_uvit", "church_unet", "cifar10_unet",
                                            "cifar10_uvit"]
    runs = [run for exp in config["experiments"].values() for run in exp["finetune"]["runs"]]
    finetunes = sum(len(run["objectives"]) for run in runs)
    scored = {name: 1 + sum(len(run["objectives"]) for run in exp["finetune"]["runs"])
              for name, exp in config["experiments"].items()}  # dense + every finetuned student
    shards = sum(n * config["experiments"][name]["sample"].get("num_shards", 1) for name, n in scored.items())
    from igsm.paper.tables import table_names

    proc = run_snakemake("-n", "-p", "all_tables")  # no --configfile: the paper config is the default
    counts = job_counts(proc.stdout)
    total = sum(scored.values())
    assert counts == {
        "download": 4, "dense_pretrained": 3, "dense_pretrained_uvit": 2, "prune": len(runs),
        "finetune": finetunes, "sample": shards, "sample_gather": total, "fid": total,
        "fid_statistics": total, "efficiency": total, "fid_reference": 4, "tables": 5,
        "combined_table": 1, "paper_table": len(table_names()), "paper_figure": 2, "paper_samples": 2, "all_tables": 1, "variant_metadata": total,
        "total": counts["total"],
    }
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    jobs = planned(proc.stdout)
    # U-ViT's jobs get its process; the U-Net's settings are those made before the VP-SDE existed.
    uvit = [b for b in jobs["finetune"] + jobs["prune"] + jobs["sample"] if "_uvit/" in b]
    unet = [b for b in jobs["finetune"] + jobs["prune"] + jobs["sample"] if "cifar10_unet/" in b]
    assert uvit and all('"process": "vpsde"' in b and '"beta_max": 20.0' in b for b in uvit)
    assert unet and all('"process"' not in b and '"beta_end": 0.02' in b for b in unet)
    assert any("euler-maruyama" in b and '"num_steps": 1000' in b for b in jobs["sample"] if "cifar10_uvit/" in b)


def latent_models_config(tmp_path):
    """config/latent_models.yaml with its ImageNet copy and ADM reference pointed at local files."""
    config = yaml.safe_load((REPO / "config" / "latent_models.yaml").read_text())
    (tmp_path / "imagenet").mkdir()
    config["datasets"]["imagenet256"]["path"] = str(tmp_path / "imagenet")
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", mu=[0.0], sigma=[[1.0]])
    config["experiments"]["imagenet_dit"]["fid"]["reference_statistics"] = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    return config


def test_latent_models_config_plans_imagenet_dit(tmp_path):
    """config/latent_models.yaml, its ImageNet copy and ADM reference pointed at local files: the
    autoencoder stored and the data encoded once, the hub DiT as teacher, NP / NP+KD / IGSM at two
    ratios, every job of a latent experiment given its autoencoder and its conditioning, guided
    250-step sampling (DiT's evaluation settings)."""
    proc = dry_run(latent_models_config(tmp_path), tmp_path, "-p", "results/tables/imagenet_dit.md")
    assert proc.returncode == 0, proc.stdout[-4000:]
    counts = job_counts(proc.stdout)
    assert {k: counts.get(k) for k in ("autoencoder", "encode", "download", "dense_pretrained_uvit", "prune",
                                       "finetune", "fid_reference")} == \
        {"autoencoder": 1, "encode": 1, "download": 1, "dense_pretrained_uvit": 1, "prune": 2, "finetune": 6,
         "fid_reference": None}  # the reference is the user's ADM batch; the teacher's rule names its family
    assert counts["sample"] == (7 + 4) * 16  # the scored models, and the dense sampler's four reuse variants
    jobs = planned(proc.stdout)
    for block in jobs["finetune"] + jobs["prune"]:
        assert "results/data/imagenet256/latents-sd_vae_ft_ema" in block
        assert '"latents": {"autoencoder": "results/autoencoders/sd_vae_ft_ema/model", "image_channels": 3}' in block
        assert '"num_classes": 1000' in block
    assert all('"guidance_scale": 1.5' in b and "sd_vae_ft_ema/model" in b for b in jobs["sample"])
    assert all(('"num_steps": 125' if "reuse-fewer-steps-f0.5" in b else '"num_steps": 250') in b for b in jobs["sample"])
    assert "stabilityai/sd-vae-ft-ema" in jobs["autoencoder"][0]
    teacher = jobs["dense_pretrained_uvit"][0]
    assert "facebook/DiT-XL-2-256" in teacher and '--settings \'{"family": "dit"}\'' in teacher


def test_latent_models_config_plans_mscoco_sd15(tmp_path):
    """config/latent_models.yaml's mscoco_sd15: COCO train and val downloaded as image stores, the
    train set encoded by SD's VAE, the hub SD U-Net as teacher; training jobs get the captions kind
    without its sampling keys (a new prompt subset reruns no finetune), sampling jobs get the val
    store as prompts (an input, and its folder in the settings) and SD's guided 50-step DDIM; block
    reuse of the teacher and the IGSM student at DiP-GO's 0.8 pruned MACs, its gate tables learnt
    on the same prompts and guidance, and the table against DiP-GO's published numbers."""
    proc = dry_run(latent_models_config(tmp_path), tmp_path, "-p", "results/paper_tables/reuse_mscoco_sd15.md")
    assert proc.returncode == 0, proc.stdout[-4000:]
    counts = job_counts(proc.stdout)
    assert {k: counts.get(k) for k in ("autoencoder", "encode", "download", "dense_pretrained_uvit", "prune",
                                       "finetune")} == \
        {"autoencoder": 1, "encode": 1, "download": 2, "dense_pretrained_uvit": 1, "prune": 1, "finetune": 3}
    jobs = planned(proc.stdout)
    for block in jobs["finetune"] + jobs["prune"]:
        assert "results/data/coco2014_train/latents-sd15_vae" in block
        assert '"kind": "captions"' in block and "prompt" not in block.split("--settings")[1].split("\n")[0]
    for block in jobs["sample"]:
        assert "results/data/coco2017_val/train" in block  # an input, and the settings' prompt_store
        assert '"prompt_store": "results/data/coco2017_val/train"' in block
        assert '"num_prompts": 5000' in block and '"guidance_scale": 7.5' in block
        assert ('"num_steps": 10' if "reuse-fewer-steps" in block else '"num_steps": 50') in block
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in jobs["dense_pretrained_uvit"][0]
    assert '"family": "sd-unet"' in jobs["dense_pretrained_uvit"][0]
    # FID against COCO val's images (fid.reference_dataset), whose captions prompted the samples
    assert len(jobs["fid_reference"]) == 1 and "results/data/coco2017_val/train" in jobs["fid_reference"][0]
    assert len(jobs["fid"]) == 4 + 2 * 4 and all("results/fid_reference/coco2017_val/clean-n0.npz" in b
                                                 for b in jobs["fid"])
    # Gate tables of dipgo, deepcache and reuse-eps for the teacher and the IGSM student (fewer-steps
    # samples 10 of the 50 steps instead), for the prompted, guided sampler.
    plans = jobs["reuse_plan"]
    assert sorted(re.search(r"--method (\S+)", b).group(1) for b in plans) == ["deepcache", "deepcache", "dipgo", "dipgo",
                                                                              "reuse-eps", "reuse-eps"]
    assert all("--mac-fraction 0.2" in b and '"guidance_scale": 7.5' in b and "results/data/coco2017_val/train" in b
               for b in plans)
    assert any("dense/reuse-fewer-steps-f0.2" in b and '"num_steps": 10' in b for b in jobs["sample"])
    assert len(jobs["clip_score"]) == 4 + 2 * 4 and len(jobs["reuse_published_table"]) == 1


def test_per_dataset_target_exists():
    proc = run_snakemake("-n", "dataset_cifar10")
    assert "tables" in job_counts(proc.stdout)


def planned(output):
    """{rule: [job block text, …]} of a dry run's job listing."""
    blocks = re.split(r"\n(?=(?:local)?rule \w+:)", output)
    jobs = {}
    for block in blocks:
        match = re.match(r"(?:local)?rule (\w+):", block)
        if match:
            jobs.setdefault(match.group(1), []).append(block)
    return jobs


def test_fashion_mnist_experiment_dry_runs(tmp_path):
    """The Fashion-MNIST experiment plans one teacher for both experiments, the second seed's
    finetunes and images with their own seeds, and the efficiency timing alone on a shared GPU."""
    config = yaml.safe_load((REPO / "config" / "fashion_mnist.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_snakemake("all_tables", "-n", "-p", "--resources", "gpu=3", "--cores", "16",
                         "--configfile", str(path), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:]
    counts = job_counts(proc.stdout)
    runs = {name: sum(len(r["objectives"]) for r in exp["finetune"]["runs"])
            for name, exp in config["experiments"].items()}
    reuse = {name: len(r.get("models", [])) * len(r.get("methods", [])) * len(r.get("mac_fractions", []))
             for name, r in ((name, exp.get("reuse", {})) for name, exp in config["experiments"].items())}
    untrained = {name: exp.get("untrained_baseline", False) for name, exp in config["experiments"].items()}
    scored = sum(1 + untrained[name] + n + reuse[name] for name, n in runs.items())
    # The teacher's images are made once for every experiment that borrows it with the same
    # sampling settings (all but the second seed's): their FIDs read fmnist_unet's statistics.
    borrowed = [name for name, exp in config["experiments"].items()
                if exp["dense"].get("from_experiment") and "seed" not in exp["sample"]]
    assert len(borrowed) == 3
    assert counts["dense_trained"] == 1 and counts["download"] == 1 and counts["fid_reference"] == 1
    assert counts["finetune"] == sum(runs.values()) and counts["sample"] == scored - len(borrowed)
    assert counts["fid"] == scored and counts["fid_statistics"] == scored - len(borrowed)
    jobs = planned(proc.stdout)
    for name in borrowed:
        fid = [b for b in jobs["fid"] if f"results/fid/{name}/dense.json" in b]
        assert len(fid) == 1 and "--statistics results/fid_stats/fmnist_unet/dense.npz" in fid[0]
    assert any("--statistics results/fid_stats/fmnist_unet_seed1/dense.npz" in b for b in jobs["fid"])
    # Gradient-flow pruning's picture, once per flow.
    assert counts["prune_report_picture"] == 1
    seed1 = [b for b in jobs["finetune"] if "fmnist_unet_seed1/" in b]
    assert len(seed1) == runs["fmnist_unet_seed1"]
    for block in seed1:
        assert "--teacher results/dense/fmnist_unet/trained/model" in block
        assert '"seed": 1' in block
    assert any('"seed": 1000000' in b and "samples/fmnist_unet_seed1/dense/" in b for b in jobs["sample"])
    # GPU slots: one per job, all of them for the efficiency timing.
    assert all("gpu=1" in b for b in jobs["finetune"] + jobs["sample"])
    assert all("gpu=3" in b for b in jobs["efficiency"])
    # The Jacobian variants reach the training settings.
    every = [b for b in jobs["finetune"] if "/igsm_every4/" in b]
    assert every and all('"jacobian_every": 4' in b for b in every)
    # Block reuse: a gate table for each method but fewer-steps, which samples with fewer steps.
    assert counts["reuse_plan"] == reuse["fmnist_reuse"] // 4 * 3
    fewer = [b for b in jobs["sample"] if "reuse-fewer-steps-f0.45/" in b]
    assert fewer and all('"num_steps": 45' in b and "--plan" not in b for b in fewer)
    assert all("--plan results/reuse/fmnist_reuse/dense/reuse-dipgo" in b
               for b in jobs["sample"] if "reuse-dipgo" in b)


def test_check_config_names_the_line_of_a_yaml_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  digits: {source: sklearn-digits\nexperiments: {}\n")
    proc = subprocess.run([sys.executable, "-m", "igsm", "check-config", str(bad)], cwd=REPO, text=True,
                          capture_output=True)
    assert proc.returncode != 0 and f"{bad}: not valid YAML at line 3" in proc.stderr, proc.stderr
    good = subprocess.run([sys.executable, "-m", "igsm", "check-config", "config/demo.yaml"], cwd=REPO,
                          text=True, capture_output=True)
    assert good.returncode == 0 and "valid" in good.stdout, good.stderr


def test_check_config_names_a_target_read_as_a_config_file():
    """A target written after the config files (`snakemake … --configfile my.yaml all_tables`
    reads it as a second config file): check-config says so in one line."""
    proc = subprocess.run([sys.executable, "-m", "igsm", "check-config", "config/demo.yaml", "all_tables"], cwd=REPO,
                          text=True, capture_output=True)
    assert proc.returncode != 0 and proc.stderr.strip() == (
        "Error: all_tables: cannot read it (No such file or directory); a target? Snakemake reads every word "
        "after --configfile as a config file: put targets first"), proc.stderr


def test_check_config_refuses_a_yte_template_without_running_it(tmp_path):
    """`__use_yte__: true` makes Snakemake run the file's `?…` expressions as Python while reading
    it (before the workflow can object; README): check-config refuses such a file, and runs nothing."""
    template = tmp_path / "template.yaml"
    template.write_text(f"__use_yte__: true\nexperiments:\n  ?open({str(tmp_path / 'ran')!r}, 'w') or 'x': {{}}\n")
    proc = subprocess.run([sys.executable, "-m", "igsm", "check-config", str(template)], cwd=REPO, text=True,
                          capture_output=True)
    assert proc.returncode != 0 and f"{template}: __use_yte__ makes it a YTE template" in proc.stderr, proc.stderr
    assert not (tmp_path / "ran").exists()


def test_unwritable_results_folder_is_named(tmp_path, monkeypatch):
    from igsm.config import ConfigError, check_writable

    check_writable(tmp_path / "results")  # writable: passes
    # As root every folder is writable, so the refusal is simulated at the permission check.
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"{tmp_path}: not writable"):
        check_writable(tmp_path / "results")


@pytest.mark.parametrize("sample, steps", [({"sampler": "euler-maruyama"}, 1000), ({"sampler": "ddim"}, 100),
                                           ({}, 100), ({"sampler": "euler-maruyama", "num_steps": 50}, 50),
                                           ({"sampler": "dpm-solver"}, 20)])
def test_sampler_steps_default_per_sampler(sample, steps):
    """The schema alone fills sample.num_steps, per sampler (an Euler–Maruyama config without it
    once ran DDIM's 100 steps)."""
    from snakemake.utils import validate

    config = demo_config()
    experiment(config)["sample"] = dict(sample)
    validate(config, str(REPO / "schemas" / "config.schema.yaml"))
    assert experiment(config)["sample"]["num_steps"] == steps
    # The stages' reading of the schema (igsm.schema.section_defaults) agrees.
    from igsm.schema import section_defaults

    assert {**section_defaults("sample", sample), **sample}["num_steps"] == steps
