"""Stable Diffusion 1.5's U-Net and text conditioning (igsm/families/sd_unet.py, igsm.conditioning's
``text`` kind; issue 31, items 2 and 3): SD 1.5's size, the family found for its networks, the tiny
offline text encoder, the empty prompt as guidance's null condition, caption dropout, batch-invariant
guided sampling, pruning that keeps cross-attention's text width, and config errors naming keys.
The objectives' terms under a text condition are checked with the other families' in
tests/test_conditioning.py."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO, TINY_ARCHITECTURE
from igsm.conditioning import ClassLabels, TextPrompts, conditioning_from_settings, save_tiny_text_encoder
from igsm.families import family_named, family_of
from igsm.models import load_model, load_pretrained, predict_noise, save_model
from igsm.sampling.denoiser import Denoiser
from igsm.sampling.samplers import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SD = family_named("sd-unet")
PROMPTS = ["a photo of a trouser", "a photo of an ankle boot", "T-shirt/top"]
HIDDEN = 32  # the tiny text encoder's width, the tiny network's cross_attention_dim
TINY = dict(family="sd-unet", sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32),
            layers_per_block=1, norm_num_groups=4, attention_head_dim=4, cross_attention_dim=HIDDEN,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    return save_tiny_text_encoder(tmp_path_factory.mktemp("clip"), PROMPTS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def prompts(encoder_folder):
    return TextPrompts(str(encoder_folder), PROMPTS, drop_prob=0.25)


def tiny(seed=0, **changes):
    torch.manual_seed(seed)
    return SD.build({**TINY, **changes}).eval()


def batch(n=4):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 8, 8, generator=generator), torch.tensor([1, 500, 999, 250])[:n]


def test_sd15_unet_has_859_5m_parameters():
    """SD 1.5's unet/config.json (diffusers' defaults but cross_attention_dim 768, sample_size 64) is
    859.52M parameters, built on the meta device (catches a config that is not SD 1.5's, e.g.
    diffusers' default cross_attention_dim 1280: 872.3M)."""
    with torch.device("meta"):
        net = SD.network_class()(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                 attention_head_dim=8, layers_per_block=2, sample_size=64, in_channels=4,
                                 out_channels=4)
    assert round(sum(p.numel() for p in net.parameters()) / 1e4) == 85952


def test_its_networks_are_its_own_not_the_unets():
    """UNet2DConditionModel has a conv_out, by which the U-Net family claims planted networks: two
    owners would be an error (catches the U-Net family claiming it again). The condition it is
    traced with is a (1, 77, cross_attention_dim) text embedding."""
    net = tiny()
    assert family_of(net) is SD and SD.class_name == type(net).__name__
    assert family_of(family_named("unet").build(TINY_ARCHITECTURE)).name == "unet"
    assert SD.condition_keyword(net) == "encoder_hidden_states"
    assert SD.example_condition(net, "cpu").shape == (1, 77, HIDDEN)


def test_block_graph_is_the_unets_with_skips():
    """down_blocks.0 feeds down_blocks.1 and, through its residuals, both up blocks (conv_in's and its
    resnet's go to up_blocks.1, its downsampler's to up_blocks.0): catches skips left out."""
    graph = SD.block_graph(tiny())
    assert graph.names == ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")
    assert graph.consumers["down_blocks.0"] == ("down_blocks.1", "up_blocks.0", "up_blocks.1")
    assert graph.consumers["down_blocks.1"] == ("mid_block", "up_blocks.0")


def test_tiny_text_encoder_tokenizes_prompts_as_words_and_loads_from_a_pipeline_layout(encoder_folder, tmp_path):
    """Every prompt's words are single known tokens (catches a vocabulary without the words, whose
    prompts would be spelled out by characters or turned into unknown tokens); the same encoder in a
    pipeline's text_encoder/ and tokenizer/ gives the same embeddings."""
    import shutil

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(encoder_folder)
    assert tokenizer.tokenize("a photo of an ankle boot") == ["a</w>", "photo</w>", "of</w>", "an</w>", "ankle</w>",
                                                              "boot</w>"]
    assert tokenizer.tokenize("T-shirt/top") == ["t</w>", "-</w>", "shirt</w>", "/</w>", "top</w>"]
    assert tokenizer.unk_token not in tokenizer.tokenize("zebra 42!")  # unseen words: byte characters
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(encoder_folder, tmp_path / "pipeline" / sub)
    own, pipeline = TextPrompts(str(encoder_folder), PROMPTS), TextPrompts(str(tmp_path / "pipeline"), PROMPTS)
    torch.testing.assert_close(pipeline.data_condition([0, 1, 2]), own.data_condition([0, 1, 2]), rtol=0, atol=0)
    assert pipeline.encoder_hidden_size() == own.encoder_hidden_size() == HIDDEN


def test_embeddings_are_the_encoders_last_hidden_state_and_the_null_is_the_empty_prompt(prompts, encoder_folder):
    """Computed independently with transformers: prompt k padded to 77 tokens; null_like gives the
    empty prompt's (catches a null of zeros, or of another prompt, and an unpadded prompt)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer, model = CLIPTokenizer.from_pretrained(encoder_folder), CLIPTextModel.from_pretrained(encoder_folder)
    with torch.no_grad():
        expected = model(tokenizer([*PROMPTS, ""], padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids).last_hidden_state
    condition = prompts.data_condition([2, 0])
    torch.testing.assert_close(condition, expected[[2, 0]])
    torch.testing.assert_close(prompts.null_like(condition), expected[[3, 3]])
    assert prompts.null_like(condition.double()).dtype == torch.float64  # the network's dtype, not float32
    described = prompts.describe()
    assert described["max_length"] == 77 and described["prompts"] == PROMPTS and len(described["text_encoder_sha256"]) == 64


def test_identity_changes_with_the_encoders_weights(tmp_path, prompts):
    """Another encoder under the same settings is another training run (catches a fingerprint that
    names the folder but not its weights)."""
    other = save_tiny_text_encoder(tmp_path / "other", PROMPTS, hidden_size=HIDDEN, seed=1)
    same = save_tiny_text_encoder(tmp_path / "same", PROMPTS, hidden_size=HIDDEN, seed=0)
    assert TextPrompts(str(other), PROMPTS, drop_prob=0.25).identity() != prompts.identity()
    assert TextPrompts(str(same), PROMPTS, drop_prob=0.25).describe()["text_encoder_sha256"] == \
        prompts.describe()["text_encoder_sha256"]  # weights, not the path, are named


def test_guidance_combines_the_prompt_and_the_empty_prompt(prompts):
    """ε̂_∅ + w·(ε̂_c − ε̂_∅) with ∅ the empty prompt's embedding, not the halves swapped."""
    net = tiny(seed=5)
    x_t, t = batch()
    condition = prompts.data_condition([0, 1, 2, 0])
    with torch.no_grad():
        conditional = predict_noise(net, x_t, t, encoder_hidden_states=condition)
        unconditional = predict_noise(net, x_t, t, encoder_hidden_states=prompts.data_condition([3, 3, 3, 3]))
    out = Denoiser(net, guidance_scale=4.0, conditioning=prompts)(x_t, t, condition)
    torch.testing.assert_close(out, unconditional + 4.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    assert (out - (conditional + 4.0 * (unconditional - conditional))).abs().max() > 1e-3


def test_captions_are_dropped_to_the_empty_prompt_as_labels_are(prompts):
    """One draw per image, the same draws as class labels' (catches per-token or global-RNG draws,
    a dropped caption that is not the empty prompt's, or kept captions of another label)."""
    labels = torch.arange(3000) % len(PROMPTS)
    condition = prompts.training_condition(labels, torch.Generator().manual_seed(0))
    as_labels = ClassLabels(len(PROMPTS), drop_prob=0.25).training_condition(labels, torch.Generator().manual_seed(0))
    table = prompts.data_condition([0, 1, 2, 3])
    torch.testing.assert_close(condition, table[as_labels], rtol=0, atol=0)
    assert abs(float((as_labels == 3).float().mean()) - 0.25) < 0.03


def test_guided_sampling_is_batch_invariant_and_prompts_follow_the_seed(prompts):
    """Image k of seeds 10..16 is the same bits at batch 7 and in batches of 3 (micro_batch 3), the
    text embeddings sliced and padded with the images."""
    net = tiny(seed=6)
    denoiser = Denoiser(net, micro_batch=3, guidance_scale=2.5, conditioning=prompts)
    seeds = list(range(10, 17))
    kwargs = dict(sampler="ddim", image_shape=(2, 8, 8), num_steps=3, conditioning=prompts)
    whole = generate(denoiser, seeds=seeds, **kwargs)
    parts = torch.cat([generate(denoiser, seeds=seeds[i:i + 3], **kwargs) for i in range(0, 7, 3)])
    assert torch.equal(whole, parts)
    torch.testing.assert_close(prompts.sampling_condition(seeds), prompts.data_condition([s % 3 for s in seeds]),
                               rtol=0, atol=0)


def test_pruning_keeps_the_text_width_and_the_heads(prompts, tmp_path):
    """Diff-Pruning's gradients under the captions: ResNet and attention widths shrink, every
    cross-attention still reads HIDDEN-wide text, each attention keeps its heads at equal widths,
    and the pruned network runs, counts its own parameters and survives a checkpoint."""
    from diffusers.models.attention_processor import Attention

    from igsm.diffusion import NoiseSchedule
    from igsm.pruning.diff_pruning import prune
    from igsm.pruning.structural import count_params_macs

    net = tiny(seed=7)
    x_t, t = batch()
    condition = prompts.data_condition([0, 1, 2, 0])
    pruned, report = prune(net, criterion="diff-pruning", channel_ratio=0.5, images=x_t,
                           schedule=NoiseSchedule.linear(20), condition=condition)
    attention = [m for m in pruned.modules() if isinstance(m, Attention)]
    assert pruned.down_blocks[0].resnets[0].conv1.out_channels == 8  # of 16
    for attn in attention:
        assert attn.heads == 4 and attn.to_q.out_features % 4 == 0 and attn.to_q.out_features < attn.to_q.in_features * 2
        if attn.is_cross_attention:
            assert attn.to_k.in_features == attn.to_v.in_features == HIDDEN
    assert any(attn.to_q.out_features == 8 for attn in attention)  # heads of 2, not of 4
    with torch.no_grad():
        out = predict_noise(pruned, x_t, t, encoder_hidden_states=condition)
    assert out.shape == x_t.shape
    assert report["pruned_params"] == count_params_macs(pruned, 8, 2)[0] == sum(p.numel() for p in pruned.parameters())
    assert report["pruned_params"] < report["dense_params"]
    save_model(pruned, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(predict_noise(load_model(tmp_path / "m"), x_t, t, encoder_hidden_states=condition),
                                   out)


def test_pretrained_from_a_pipeline_folder(tmp_path):
    """dense.pretrained: a pipeline folder with the network in unet/ (as SD 1.5 is laid out)."""
    net = tiny()
    net.save_pretrained(tmp_path / "pipeline" / "unet")
    loaded = load_pretrained(str(tmp_path / "pipeline"), {"family": "sd-unet"})
    x_t, t = batch(2)
    text = torch.randn(2, 77, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(predict_noise(loaded, x_t, t, encoder_hidden_states=text),
                                   predict_noise(net, x_t, t, encoder_hidden_states=text))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no diffusers SD U-Net \(neither config.json nor unet/config"):
        load_pretrained(str(tmp_path / "empty"), {"family": "sd-unet"})


def test_config_errors_name_the_keys(prompts, encoder_folder):
    key = "experiments.x"
    assert SD.conditioning_errors(key, TINY, prompts) == []
    assert SD.conditioning_errors(key, None, prompts) == []  # a pretrained network's width: checked when loaded
    assert "experiments.x.conditioning.kind: none, but the SD U-Net is text-conditional" in \
        SD.conditioning_errors(key, TINY, None)[0]
    assert "conditioning.kind: 'class', but the SD U-Net family's networks take no such condition" in \
        SD.conditioning_errors(key, TINY, ClassLabels(3))[0]
    wide = SD.conditioning_errors(key, {**TINY, "cross_attention_dim": 768}, prompts)
    assert len(wide) == 1 and "experiments.x.architecture.cross_attention_dim: 768, but conditioning.text_encoder" in \
        wide[0] and "width 32" in wide[0]
    unset = {k: v for k, v in TINY.items() if k != "cross_attention_dim"}
    assert "cross_attention_dim: 1280" in SD.conditioning_errors(key, unset, prompts)[0]  # diffusers' default
    hub = TextPrompts("stable-diffusion-v1-5/stable-diffusion-v1-5", PROMPTS)
    assert SD.conditioning_errors(key, TINY, hub) == []  # a hub id's width is not fetched to check a config
    with pytest.raises(ValueError, match=r"conditioning.prompts: \[\], must be a non-empty list of strings"):
        conditioning_from_settings({"kind": "text", "text_encoder": str(encoder_folder), "prompts": []})
    with pytest.raises(ValueError, match=r"conditioning.text_encoder: required for kind 'text' \(its keys: "
                                         r"text_encoder, prompts, drop_prob\)"):
        conditioning_from_settings({"kind": "text", "prompts": PROMPTS})
    with pytest.raises(ValueError, match=r"labels 0\.\.3 do not fit the 3 conditioning.prompts"):
        prompts.check_labels([0, 3], "dataset results/data/x")
    prompts.check_labels([0, 2], "dataset results/data/x")
    with pytest.raises(ValueError, match=r"conditioning.text_encoder: local folder .* holds no CLIP tokenizer \(neither "
                                         r"tokenizer_config.json nor tokenizer/tokenizer_config.json\)"):
        TextPrompts(str(encoder_folder.parent), PROMPTS).describe()
    with pytest.raises(ValueError, match=r"conditioning.text_encoder: local folder \./no/such/encoder does not exist"):
        TextPrompts("./no/such/encoder", PROMPTS).describe()


def test_validate_names_the_conditioning_an_sd_unet_experiment_lacks():
    """The whole config check: an sd-unet experiment without conditioning is refused naming its key."""
    import yaml

    from igsm.config import ConfigError, validate

    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    exp = config["experiments"]["digits_unet"]
    exp["architecture"] = {k: v for k, v in TINY.items() if k not in ("in_channels", "out_channels")}
    exp["architecture"].update(in_channels=1, out_channels=1)
    with pytest.raises(ConfigError, match=r"experiments\.digits_unet\.conditioning\.kind: none, but the SD U-Net is "
                                          r"text-conditional"):
        validate(config)


def test_the_cli_writes_a_tiny_text_encoder_a_config_can_name(tmp_path):
    """`igsm tiny-text-encoder` passes its options on (catches --hidden-size or the prompts ignored)."""
    from click.testing import CliRunner

    from igsm import cli

    out = tmp_path / "clip"
    result = CliRunner().invoke(cli.main, ["tiny-text-encoder", "--out", str(out), "--prompt", PROMPTS[0],
                                           "--prompt", PROMPTS[2], "--hidden-size", "24", "--heads", "3"])
    assert result.exit_code == 0, result.output
    text = conditioning_from_settings({"kind": "text", "text_encoder": str(out), "prompts": [PROMPTS[0], PROMPTS[2]]})
    assert text.encoder_hidden_size() == 24 and text.data_condition([1]).shape == (1, 77, 24)
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(out).tokenize(PROMPTS[2]) == ["t</w>", "-</w>", "shirt</w>", "/</w>", "top</w>"]


def test_the_training_loop_gives_the_teacher_the_students_captions(prompts, tmp_path):
    """Finetuning an SD U-Net on a labelled store: a student identical to its teacher has KD and
    Jacobian terms 0 at the first step, captions dropped to the empty prompt included (catches the
    loop handing the teacher no condition, another draw, or the condition of other rows)."""
    import copy
    import json

    import numpy as np

    from igsm.data.store import write_store
    from igsm.training import TrainingOptions, train

    rng = np.random.default_rng(0)
    store = write_store(tmp_path / "store", [(rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), np.arange(8) % 3)])
    student = tiny(seed=8, in_channels=1, out_channels=1)
    options = TrainingOptions.from_dict({"objective": {"weights": {"np": 1.0, "kd": 1.0, "jm1": 1.0, "jm2": 1.0}},
                                         "num_steps": 1, "batch_size": 4, "log_every": 1, "checkpoint_every": 100})
    half_dropped = TextPrompts(prompts.text_encoder, PROMPTS, drop_prob=0.5)
    train(student, store, options, tmp_path / "ck", tmp_path / "metrics.jsonl", teacher=copy.deepcopy(student),
          conditioning=half_dropped)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["np"] > 1 and max(first["kd"], first["jm1"], first["jm2"]) < 1e-9, first  # float32 rounding only


def test_a_hub_text_encoder_offline_fails_at_once_naming_the_key(monkeypatch):
    """The hub is asked only where it answers: offline, an id not in the cache fails in seconds,
    naming the key and `hf download`, instead of the hub client's minutes of retries."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"conditioning.text_encoder: could not load the CLIP (tokenizer|text encoder) from "
                                         r"openai/clip-vit-large-patch14 .*hf download openai/clip-vit-large-patch14"):
        TextPrompts("openai/clip-vit-large-patch14", PROMPTS).describe()
    assert time.perf_counter() - started < 20
