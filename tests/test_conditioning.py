"""Class and text conditioning through the objectives, the sampler and pruning (igsm.conditioning;
issue 31).

Float64 brute force on tiny class-conditional U-Nets (diffusers UNet2DModel with num_class_embeds),
DiTs (igsm.families.dit), U-ViTs and text-conditional SD U-Nets (igsm.families.sd_unet, label k's
condition the embedding of prompt k, the null label's the empty prompt's; more in test_sd_unet.py):
the objective's terms with a condition against full per-sample Jacobians taken under that
condition; the teacher given the student's condition; classifier-free guidance against its formula;
batch invariance of guided sampling; pruning a conditional U-Net."""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch

from igsm.conditioning import (Captions, ClassLabels, TextPrompts, conditioning_from_settings, guided, kinds,
                               load_text_encoder, sampling_section, save_tiny_text_encoder, training_section)
from igsm.diffusion import NoiseSchedule, antithetic_timesteps
from igsm.models import condition_inputs, predict_noise
from igsm.objectives import NAMES, build_objective, orthonormalize
from igsm.sampling.denoiser import Denoiser
from igsm.sampling.samplers import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

NUM_CLASSES = 3
ALL_TERMS = {"np": 1.0, "kd": 0.5, "jm1": 0.3, "jm2": 0.1, "jm2_log": 0.2, "jm2_rel": 0.4}


def conditional_unet(widths, seed, dtype=torch.float64):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=widths, layers_per_block=1,
                      norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                      num_class_embeds=NUM_CLASSES + 1)
    with torch.no_grad():  # diffusers initialises the class embedding at N(0, 1): make it matter at this size
        net.class_embedding.weight.mul_(3.0)
    return net.to(dtype).eval()


def make_batch(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule.linear()
    x0 = torch.rand(batch, 2, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    t = antithetic_timesteps(batch, schedule.num_steps, generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, NUM_CLASSES])[:batch]  # the last one the null label
    return schedule.add_noise(x0, noise, t), t, noise, labels


def conditional_jacobians(net, x, t, labels):
    """(B, n, n): the per-sample Jacobian ∂s_b/∂x_b under each sample's own label."""
    batch, n = x.shape[0], x[0].numel()
    full = torch.autograd.functional.jacobian(lambda z: predict_noise(net, z, t, **condition_inputs(net, labels)), x)
    full = full.reshape(batch, n, batch, n)
    return torch.stack([full[b, :, b, :] for b in range(batch)])


def reference_terms(student, teacher, x, t, noise, labels, v, projection):
    with torch.no_grad():
        s = predict_noise(student, x, t, **condition_inputs(student, labels))
        s_dense = predict_noise(teacher, x, t, **condition_inputs(teacher, labels))
    jac, jac_dense = conditional_jacobians(student, x, t, labels), conditional_jacobians(teacher, x, t, labels)
    flat = v.flatten(2)
    pattern = "bij,kbi->kbj" if projection == "vjp" else "bij,kbj->kbi"
    p, p_dense = torch.einsum(pattern, jac, flat), torch.einsum(pattern, jac_dense, flat)
    a, b = p_dense.square().sum(2), p.square().sum(2)
    return {"np": (s - noise).square().flatten(1).sum(1), "kd": (s - s_dense).square().flatten(1).sum(1),
            "jm1": (p - p_dense).square().sum(2).mean(0), "jm2": (a - b).square().mean(0),
            "jm2_log": (torch.log(a) - torch.log(b)).square().mean(0), "jm2_rel": ((a - b) / a).square().mean(0)}


def conditional_dit(width, seed, dtype=torch.float64, **config):
    """A tiny DiT (igsm.families.dit: diffusers' class, its own label dropout off) on 8×8 images."""
    from igsm.families import family_named

    torch.manual_seed(seed)
    architecture = dict(sample_size=8, in_channels=2, patch_size=4, num_attention_heads=2, attention_head_dim=width,
                        num_layers=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1, **config)
    net = family_named("dit").build(architecture)
    with torch.no_grad():  # adaLN-Zero starts at the identity: give every layer a say
        for name, param in net.named_parameters():
            if "norm1.linear" in name or "proj_out" in name:
                param.normal_(0, 0.3)
    return net.to(dtype).eval()


def conditional_uvit(width, seed, dtype=torch.float64):
    """A tiny class-conditional U-ViT (igsm.uvit: the label a token of its own)."""
    from igsm.uvit import UViT

    torch.manual_seed(seed)
    net = UViT(img_size=8, patch_size=4, in_chans=2, embed_dim=width, depth=2, num_heads=2,
               num_classes=NUM_CLASSES + 1)
    with torch.no_grad():
        net.label_emb.weight.mul_(20.0)  # the reference's std 0.02 start: make the label matter here
    return net.to(dtype).eval()


def conditional_sd_unet(widths, seed, dtype=torch.float64):
    """A tiny SD U-Net (diffusers UNet2DConditionModel): cross-attention on TEXT_WIDTH-wide text."""
    from igsm.families import family_named

    torch.manual_seed(seed)
    net = family_named("sd-unet").build(dict(
        sample_size=8, in_channels=2, out_channels=2, block_out_channels=widths, layers_per_block=1, norm_num_groups=4,
        attention_head_dim=2, cross_attention_dim=TEXT_WIDTH, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    return net.to(dtype).eval()


PAIRS = {"unet": lambda: (conditional_unet((4, 8), seed=1), conditional_unet((8, 16), seed=2)),
         "dit": lambda: (conditional_dit(4, seed=1), conditional_dit(8, seed=2)),
         "uvit": lambda: (conditional_uvit(8, seed=1), conditional_uvit(16, seed=2)),
         "sd-unet": lambda: (conditional_sd_unet((4, 8), seed=1), conditional_sd_unet((8, 16), seed=2))}
PROMPTS = ["a photo of a trouser", "a photo of a bag", "a photo of a sneaker"]  # NUM_CLASSES of them
TEXT_WIDTH = 16


class Pair(NamedTuple):
    student: torch.nn.Module
    teacher: torch.nn.Module
    condition: Callable  # labels (the null label NUM_CLASSES among them) → the networks' condition


@pytest.fixture(scope="module")
def text_prompts(tmp_path_factory):
    # 8 tokens, not CLIP's 77: the prompts fit, and the float64 Jacobians below cost a tenth
    folder = save_tiny_text_encoder(tmp_path_factory.mktemp("clip"), PROMPTS, hidden_size=TEXT_WIDTH, max_length=8)
    return TextPrompts(str(folder), PROMPTS)


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request):
    student, teacher = PAIRS[request.param]()
    if request.param == "sd-unet":  # label k: prompt k's embedding; the null label (len(PROMPTS)): the empty prompt's
        text = request.getfixturevalue("text_prompts")
        return Pair(student, teacher, lambda labels: text.data_condition(labels).double())
    return Pair(student, teacher, lambda labels: labels)


@pytest.mark.parametrize("projection", ["vjp", "jvp"])
def test_conditional_terms_equal_full_jacobians_under_the_condition(pair, projection):
    """Catches: the condition not reaching the Jacobian products (they would be those of another
    label's network), or the Jacobian taken through the condition's embedding."""
    student, teacher, condition_of = pair
    x_t, t, noise, labels = make_batch()
    v = orthonormalize(torch.randn((2, *x_t.shape), generator=torch.Generator().manual_seed(3), dtype=x_t.dtype))
    objective = build_objective(ALL_TERMS, projection, num_directions=2, directions=lambda x, t_, g: v)
    total, terms = objective(student, teacher, x_t, t, noise, None, condition=condition_of(labels))
    expected = reference_terms(student, teacher, x_t, t, noise, condition_of(labels), v, projection)
    assert set(terms) == set(NAMES)
    for name in NAMES:
        torch.testing.assert_close(terms[name], expected[name], rtol=1e-6, atol=1e-12, msg=name)
    # The labels matter at all: under other labels the terms differ.
    _, other = objective(student, teacher, x_t, t, noise, None, condition=condition_of(labels.roll(1)))
    assert not torch.allclose(other["kd"], terms["kd"])


def test_jacobian_rows_get_their_own_condition(pair):
    """jacobian_fraction < 1 splits the batch: each part's networks must get that part's labels
    (catches slicing x_t but binding the whole batch's condition, or the wrong rows')."""
    student, teacher, condition_of = pair
    x_t, t, noise, labels = make_batch()
    labels = condition_of(labels)
    v = orthonormalize(torch.randn((1, *x_t.shape), generator=torch.Generator().manual_seed(4), dtype=x_t.dtype))
    objective = build_objective(ALL_TERMS, directions=lambda x, t_, g: v[:, :len(x)],
                                jacobian_fraction=0.5)
    _, terms = objective(student, teacher, x_t, t, noise, None, condition=labels)
    rows = torch.tensor([0, 2])  # igsm.objectives.jacobian_rows(4, 0.5)
    expected = reference_terms(student, teacher, x_t[rows], t[rows], noise[rows], labels[rows], v[:, :2], "vjp")
    full = reference_terms(student, teacher, x_t, t, noise, labels, v, "vjp")
    torch.testing.assert_close(terms["kd"], full["kd"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(terms["jm2"][rows], 2 * expected["jm2"], rtol=1e-6, atol=1e-12)


def test_teacher_gets_the_students_condition(pair):
    """A student identical to its teacher has zero KD and Jacobian terms under any labels; with
    the condition dropped or replaced for the teacher (the null label, another class) they are not."""
    student, _, condition_of = pair
    teacher = copy.deepcopy(student)
    x_t, t, noise, labels = make_batch()
    objective = build_objective({"np": 1.0, "kd": 1.0, "jm1": 1.0, "jm2": 1.0})
    _, terms = objective(student, teacher, x_t, t, noise, torch.Generator().manual_seed(0),
                         condition=condition_of(labels))
    for name in ("kd", "jm1", "jm2"):
        assert float(terms[name].abs().max()) < 1e-20, name
    with torch.no_grad():
        nulled = predict_noise(teacher, x_t, t, **condition_inputs(teacher, condition_of(torch.full_like(labels,
                                                                                                      NUM_CLASSES))))
        own = predict_noise(student, x_t, t, **condition_inputs(student, condition_of(labels)))
    assert float((own - nulled)[:3].square().sum()) > 1e-8  # a teacher given the null label would show (KD < 1e-20)


def test_a_conditional_network_refuses_to_run_without_its_condition(pair):
    student, _, _ = pair
    with pytest.raises(ValueError, match="no condition for a conditional "
                                         "(UNet2DModel|DiTTransformer2DModel|UViT|UNet2DConditionModel)"):
        condition_inputs(student, None)
    x_t, t, noise, _ = make_batch()
    with pytest.raises(ValueError, match="no condition for a conditional"):
        Denoiser(student)(x_t.float(), t)


def test_guidance_combines_the_conditional_and_the_null_prediction():
    """ε̂_∅ + w·(ε̂_c − ε̂_∅), not the halves swapped (ε̂_c + w·(ε̂_∅ − ε̂_c)) nor the null label
    taken from the wrong end of the embedding table."""
    net = conditional_unet((4, 8), seed=5, dtype=torch.float32)
    x_t, t, _, labels = make_batch()
    x_t, labels = x_t.float(), labels.remainder(NUM_CLASSES)
    conditioning = ClassLabels(NUM_CLASSES)
    with torch.no_grad():
        conditional = predict_noise(net, x_t, t, class_labels=labels)
        unconditional = predict_noise(net, x_t, t, class_labels=torch.full_like(labels, NUM_CLASSES))
    out = Denoiser(net, guidance_scale=4.0, conditioning=conditioning)(x_t, t, labels)
    torch.testing.assert_close(out, unconditional + 4.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    assert (out - (conditional + 4.0 * (unconditional - conditional))).abs().max() > 1e-2
    torch.testing.assert_close(guided(conditional, unconditional, 1.0), conditional)
    plain = Denoiser(net, conditioning=conditioning)(x_t, t, labels)  # w = 1: the conditional prediction
    torch.testing.assert_close(plain, conditional, rtol=1e-5, atol=1e-5)


def test_guided_sampling_is_batch_invariant_and_labels_follow_the_seed():
    """Image k of seeds 10..16 is the same bits at batch 7 and in batches of 3 (micro_batch 3):
    each chunk gets its own images' labels, padded with them (catches the condition not sliced with
    the images, or labels drawn by position in the batch)."""
    net = conditional_unet((4, 8), seed=6, dtype=torch.float32)
    conditioning = ClassLabels(NUM_CLASSES)
    denoiser = Denoiser(net, micro_batch=3, guidance_scale=2.5, conditioning=conditioning)
    seeds = list(range(10, 17))
    kwargs = dict(sampler="ddim", image_shape=(2, 8, 8), num_steps=4, conditioning=conditioning)
    whole = generate(denoiser, seeds=seeds, **kwargs)
    parts = torch.cat([generate(denoiser, seeds=seeds[i:i + 3], **kwargs) for i in range(0, 7, 3)])
    assert torch.equal(whole, parts)
    assert conditioning.sampling_condition(seeds).tolist() == [s % NUM_CLASSES for s in seeds]


def test_training_condition_drops_labels_to_the_null_label_at_its_rate():
    conditioning = ClassLabels(NUM_CLASSES, drop_prob=0.25)
    labels = torch.arange(20000) % NUM_CLASSES
    condition = conditioning.training_condition(labels, torch.Generator().manual_seed(0))
    dropped = condition == NUM_CLASSES
    assert abs(float(dropped.float().mean()) - 0.25) < 0.015
    assert torch.equal(condition[~dropped], labels[~dropped])  # the rest keep their own label
    assert torch.equal(ClassLabels(NUM_CLASSES, drop_prob=0.0).training_condition(labels, torch.Generator()), labels)


def test_settings_errors_name_the_key():
    assert kinds()[0] == "none" and "class" in kinds()
    assert conditioning_from_settings({"kind": "none"}) is None
    with pytest.raises(ValueError, match="conditioning.kind: unknown 'audio'"):
        conditioning_from_settings({"kind": "audio"})
    with pytest.raises(ValueError, match=r"conditioning.num_classes: required for kind 'class' \(its keys: "
                                         r"num_classes, drop_prob\)"):
        conditioning_from_settings({"kind": "class"})
    with pytest.raises(ValueError, match="conditioning.drop_prob"):
        conditioning_from_settings({"kind": "class", "num_classes": 3, "drop_prob": 1.0})
    with pytest.raises(ValueError, match=r"labels 0\.\.5 do not fit conditioning.num_classes 3"):
        ClassLabels(3).check_labels([0, 5], "dataset results/data/x")


def test_pruning_a_conditional_unet_keeps_it_conditional():
    """Diff-Pruning's gradients under the images' labels; the pruned network (class embedding
    pruned with the time embedding it is added to) still runs on labels and counts its MACs."""
    from igsm.pruning.diff_pruning import prune
    from igsm.pruning.structural import count_params_macs

    net = conditional_unet((8, 16), seed=7, dtype=torch.float32)
    images = torch.rand(4, 2, 8, 8) * 2 - 1
    pruned, report = prune(net, criterion="diff-pruning", channel_ratio=0.5, images=images,
                           schedule=NoiseSchedule.linear(20), condition=torch.tensor([0, 1, 2, 0]))
    assert report["num_gradient_steps"] > 0 and report["pruned_params"] < report["dense_params"]
    assert pruned.class_embedding.embedding_dim == pruned.time_embedding.linear_2.out_features
    with torch.no_grad():
        out = predict_noise(pruned, images, torch.tensor([5, 5, 5, 5]), class_labels=torch.tensor([0, 1, 2, 3]))
    assert out.shape == images.shape
    assert count_params_macs(pruned, 8, 2)[0] == report["pruned_params"]


# ---- captions: each image its own caption (MSCOCO; issue 31, items 4 and 7) --------------------

CAPTIONS = ["a photo of a trouser", "a bag", "a photo of a sneaker on a bag", "a sneaker"]


@pytest.fixture(scope="module")
def captioned_store(tmp_path_factory, text_prompts):
    """A store of four images with CAPTIONS (labels: their positions), and the encoder's folder."""
    from igsm.data import write_store

    folder = tmp_path_factory.mktemp("captioned")
    images = np.zeros((len(CAPTIONS), 4, 4, 3), np.uint8)
    store = write_store(folder / "store", [(images, np.arange(len(CAPTIONS)), CAPTIONS)],
                        extra={"captions_info": {"source": "test"}})
    return store, text_prompts.text_encoder


def test_captions_embed_each_images_own_caption_and_drop_as_labels_do(captioned_store):
    """A batch's condition is the encoder's embedding of each image's own caption (by its label, the
    caption's position), a dropped one the empty prompt's, with the draws of ClassLabels (catches
    captions taken by position in the batch, or a dropout drawn differently from the other kinds)."""
    store, encoder = captioned_store
    captions = Captions(encoder, drop_prob=0.5).for_data(store)
    tokenizer, model, _ = load_text_encoder(encoder)

    def by_hand(texts):
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        with torch.no_grad():
            return model(input_ids=tokens.input_ids).last_hidden_state.float()

    labels = np.array([2, 0, 3, 3, 1, 2, 0, 1])
    condition = captions.training_condition(labels, torch.Generator().manual_seed(4))
    dropped = ClassLabels(len(CAPTIONS), drop_prob=0.5).training_condition(labels, torch.Generator().manual_seed(4))
    expected = by_hand([CAPTIONS[k] if k < len(CAPTIONS) else "" for k in dropped.tolist()])
    assert 0 < int((dropped == len(CAPTIONS)).sum()) < len(labels)  # both kinds of row are checked
    torch.testing.assert_close(condition, expected)
    torch.testing.assert_close(captions.data_condition([1, 3]), by_hand([CAPTIONS[1], CAPTIONS[3]]))
    torch.testing.assert_close(captions.null_like(condition[:3]), by_hand([""]).expand(3, -1, -1))
    with pytest.raises(ValueError, match="labels 0..4 are not positions of its 4 captions"):
        captions.check_labels([0, 4], "dataset x")


def test_captions_need_a_captioned_store(captioned_store, tmp_path):
    from igsm.data import write_store

    _, encoder = captioned_store
    plain = write_store(tmp_path / "plain", [(np.zeros((2, 4, 4, 3), np.uint8), np.arange(2))])
    with pytest.raises(ValueError, match=f"dataset {plain.directory}: no captions"):
        Captions(encoder).for_data(plain)
    with pytest.raises(ValueError, match=f"conditioning.prompts_dataset: dataset {plain.directory} has no captions"):
        Captions(encoder, prompt_store=str(plain.directory)).sampling_prompts([0])


def test_sampling_prompts_are_a_seeded_subset_indexed_by_the_images_seed(captioned_store):
    """The image of seed s gets prompts[s mod n], the prompts the first n captions of a permutation
    drawn with prompt_seed: the same for any batch, another subset for another seed."""
    store, encoder = captioned_store
    captions = Captions(encoder, num_prompts=3, prompt_seed=7, prompt_store=str(store.directory))
    order = np.random.default_rng(7).permutation(len(CAPTIONS))[:3]
    seeds = [0, 1, 2, 3, 4, 10]
    assert captions.sampling_prompts(seeds) == [CAPTIONS[order[s % 3]] for s in seeds]
    assert captions.sampling_prompts([10]) == captions.sampling_prompts(seeds)[5:]
    subsets = {tuple(Captions(encoder, num_prompts=3, prompt_seed=seed, prompt_store=str(store.directory))
                     .sampling_prompts(range(3))) for seed in range(6)}
    assert len(subsets) > 1
    described = captions.describe()
    assert described["num_prompts"] == 3 and described["prompt_store_fingerprint"] == store.fingerprint()
    with pytest.raises(ValueError, match="conditioning.num_prompts: 9, but dataset .* has 4 captions"):
        Captions(encoder, num_prompts=9, prompt_store=str(store.directory)).sampling_prompts([0])


def test_training_jobs_do_not_get_the_sampling_keys():
    """Changing the prompt subset must rerun sampling only: the finetunes' settings leave it out,
    the sampling jobs' carry it and the prompt store (a job input); other kinds pass as they are."""
    section = {"kind": "captions", "text_encoder": "enc", "drop_prob": 0.1, "prompts_dataset": "val",
               "num_prompts": 50, "prompt_seed": 3}
    assert training_section(section) == {"kind": "captions", "text_encoder": "enc", "drop_prob": 0.1}
    sampling, store = sampling_section(section, "train", lambda name: f"results/data/{name}/train")
    assert store == "results/data/val/train" and sampling == {**section, "prompt_store": store}
    assert sampling_section({**section, "prompts_dataset": ""}, "train", lambda n: n)[1] == "train"
    labels = {"kind": "class", "num_classes": 3, "drop_prob": 0.1}
    assert training_section(labels) == labels and sampling_section(labels, "train", str) == (labels, None)


def test_an_igsm_finetune_reads_the_captions_of_its_store(captioned_store, tmp_path):
    """Two IGSM steps of a tiny SD U-Net on a captioned store, student and teacher under each image's
    caption (catches a loop that does not bind the store's captions, or a kind that only works on
    prompts per label)."""
    import json

    from igsm.data import load_images
    from igsm.families import family_named
    from igsm.training import TrainingOptions, train

    store, encoder = captioned_store
    rgb = load_images(store.directory)
    architecture = dict(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=TEXT_WIDTH,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    student, teacher = family_named("sd-unet").build(architecture), family_named("sd-unet").build(architecture)
    options = TrainingOptions.from_dict({"num_steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2,
                                         "hflip": False, "objective": {"weights": {"np": 1.0, "kd": 1.0, "jm2": 0.1}}})
    train(student, rgb, options, tmp_path / "checkpoints", tmp_path / "metrics.jsonl", teacher=teacher.eval(),
          conditioning=Captions(encoder, drop_prob=0.25))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[k]) and r[k] > 0 for r in records for k in ("np", "kd", "jm2"))
