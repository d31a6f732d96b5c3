"""Conditioning: what a conditional network is given besides x_t and t, in every stage (issue 31).

An experiment's ``conditioning`` section names a kind, a member of this module's registry:

* ``class`` (:class:`ClassLabels`): class labels 0..K−1 from the image store's labels (DiT's
  ImageNet classes, Fashion-MNIST's ten). The label K is the *null* label, the "no condition" of
  classifier-free guidance (Ho & Salimans 2022): DiT's LabelEmbedding keeps the same extra row
  (``num_classes`` + 1 embeddings when it drops labels), a U-Net gets it as
  ``num_class_embeds`` = K + 1 and a U-ViT as ``num_classes`` = K + 1.
* ``text`` (:class:`TextPrompts`; issue 31, item 3): each label k captioned by a prompt, given to
  the network as a frozen CLIP text encoder's embedding of it (Stable Diffusion's cross-attention
  input, igsm.families.sd_unet); the null condition is the empty prompt's embedding, SD's.
* ``captions`` (:class:`Captions`; issue 31, items 4 and 7): each image captioned by its own text,
  the image store's (MSCOCO), embedded alike per batch; samples prompted by a seeded subset of a
  captioned dataset's captions.

One interface, bound to the store a job reads (:meth:`for_data`: a captions kind takes the store's
captions), read by the training loop (:meth:`training_condition`: the batch's labels, each
replaced by the null one with probability ``drop_prob``, so that the network also learns the
unconditional prediction that guidance needs), the sampler (:meth:`sampling_condition`: an image's
condition, a function of its seed alone, as its noise is, so that batch invariance is kept;
:meth:`null_like`: the unconditional half) and pruning (:meth:`data_condition`: the data's own
labels, no dropout). The network receives a condition by its family's keyword
(igsm.families.Family.condition_keyword; igsm.models.condition_inputs).

Classifier-free guidance (:func:`guided`): ε̂ = ε̂(x, t, ∅) + w·(ε̂(x, t, c) − ε̂(x, t, ∅)), w the
sampler setting ``guidance_scale`` (1: the conditional prediction alone, no unconditional pass).
"""

from __future__ import annotations

# torch is imported inside the methods: the config checks read the registry while the workflow
# builds its DAG, which must not pay torch's import.

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from igsm.registry import registered_twice

if TYPE_CHECKING:
    import torch

NONE = "none"  # conditioning.kind of an unconditional experiment


@dataclass(frozen=True)
class ClassLabels:
    """Class labels 0..num_classes−1, the null label ``num_classes``."""

    num_classes: int
    drop_prob: float = 0.1
    kind = "class"

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"conditioning.num_classes: {self.num_classes}, must be ≥ 1")
        if not 0 <= self.drop_prob < 1:
            raise ValueError(f"conditioning.drop_prob: {self.drop_prob}, must be in [0, 1)")

    def for_data(self, images) -> "ClassLabels":
        """This conditioning for the store a job reads: labels are all it needs, as they are."""
        return self

    @property
    def null_label(self) -> int:
        return self.num_classes

    def check_labels(self, labels, where: str) -> None:
        """``ValueError`` naming ``where`` (the dataset) if a label is outside 0..num_classes−1."""
        labels = np.asarray(labels)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"{where}: labels {int(labels.min())}..{int(labels.max())} do not fit "
                             f"conditioning.num_classes {self.num_classes} (labels 0..{self.num_classes - 1})")

    def data_condition(self, labels, device=None) -> torch.Tensor:
        """The images' own labels as the network takes them (pruning; no dropout)."""
        import torch

        return torch.as_tensor(labels, dtype=torch.long).to(device)

    def training_condition(self, labels, generator: torch.Generator, device=None) -> torch.Tensor:
        """The batch's labels, each the null label with probability ``drop_prob`` (one uniform draw
        per image from ``generator``, the step's)."""
        return dropped_to_null(self.data_condition(labels, device), self.null_label, self.drop_prob, generator)

    def sampling_condition(self, seeds, device=None) -> torch.Tensor:
        """The class of the image of seed s: s mod num_classes (every class equally often over
        consecutive seeds, and the label a function of the image's seed alone, like its noise: the
        same at any batch size, shard split or GPU count)."""
        import torch

        return torch.as_tensor(np.asarray(seeds), dtype=torch.long).remainder(self.num_classes).to(device)

    def null_like(self, condition: torch.Tensor) -> torch.Tensor:
        """The unconditional input for each row of ``condition``."""
        import torch

        return torch.full_like(condition, self.null_label)

    def describe(self) -> dict:
        """What the samples' metadata and the FID JSON record."""
        return {"kind": self.kind, "num_classes": self.num_classes, "drop_prob": self.drop_prob,
                "null_label": self.null_label, "sampling_labels": "the image of seed s: class s mod num_classes"}

    def identity(self) -> bytes:
        """Bytes naming the conditioning in training fingerprints."""
        return json.dumps({"kind": self.kind, "num_classes": self.num_classes, "drop_prob": self.drop_prob},
                          sort_keys=True).encode()


def dropped_to_null(labels: torch.Tensor, null_label: int, drop_prob: float, generator: torch.Generator):
    """``labels`` (a long tensor), each ``null_label`` with probability ``drop_prob``: one uniform
    draw per image from ``generator``, none where ``drop_prob`` is 0 (every kind's caption/label
    dropout, so that all kinds draw alike)."""
    import torch

    if drop_prob == 0:
        return labels
    drop = torch.rand(len(labels), generator=generator, device=generator.device).to(labels.device)
    return torch.where(drop < drop_prob, torch.full_like(labels, null_label), labels)


# ---- text prompts (Stable Diffusion's conditioning) -------------------------------------------

# Where a diffusers pipeline keeps its text encoder and tokenizer; a transformers folder of its own
# has both at the top level.
TEXT_ENCODER_SUBFOLDER, TOKENIZER_SUBFOLDER = "text_encoder", "tokenizer"
EMPTY_PROMPT = ""  # the null condition: SD's unconditional input for classifier-free guidance


@dataclass(frozen=True)
class TextPrompts:
    """Image labels captioned by prompts: the image of label k is captioned ``prompts[k]`` (e.g.
    Fashion-MNIST's "a photo of a trouser"), and the network gets the caption's embedding: the last
    hidden state of the frozen CLIP text encoder ``text_encoder`` (a local folder or hub id holding a
    transformers CLIPTextModel and CLIPTokenizer, at its top level or in ``text_encoder/`` and
    ``tokenizer/`` as a diffusers pipeline has them) on the prompt padded to the tokenizer's max
    length (77 for CLIP), as Stable Diffusion conditions its U-Net. A dropped caption becomes the
    empty prompt "" (SD's classifier-free guidance), drawn with ``drop_prob`` as class labels are.

    The embeddings are computed on the fly by the job that needs them, once per distinct prompt
    (cached on the object), not stored in the data stage: there are a handful of prompts, and the
    encoder stays one config key whose weights' digest the training fingerprint and the samples'
    metadata record (:meth:`identity`, :meth:`describe`). Internally the condition is an index into
    the table of the prompts' embeddings, ``len(prompts)`` the empty prompt's row.
    """

    text_encoder: str
    prompts: list
    drop_prob: float = 0.1
    kind = "text"

    def __post_init__(self):
        _check_text_settings(self.text_encoder, self.drop_prob)
        if (not isinstance(self.prompts, (list, tuple)) or not self.prompts
                or not all(isinstance(p, str) for p in self.prompts)):
            raise ValueError(f"conditioning.prompts: {self.prompts!r}, must be a non-empty list of strings "
                             f"(prompts[k] captions the images of label k)")
        object.__setattr__(self, "prompts", tuple(self.prompts))  # frozen: hashable, unchangeable
        object.__setattr__(self, "_loaded", {})  # the encoder, its digest and embedding tables, on first use

    def config_errors(self, key: str) -> list[str]:
        """What the config alone shows: a local encoder folder that does not exist (``key``: the
        experiment's); a hub id is checked by its first job."""
        from igsm.hub import looks_like_local_path

        if looks_like_local_path(self.text_encoder) and not Path(self.text_encoder).expanduser().is_dir():
            return [f"{key}.conditioning.text_encoder: local folder {self.text_encoder} does not exist (offline, "
                    f"`python -m igsm tiny-text-encoder --out {self.text_encoder} --prompt …` writes a random one "
                    "for the prompts)"]
        return []

    def for_data(self, images) -> "TextPrompts":
        """This conditioning for the store a job reads: prompts per label need nothing from it."""
        return self

    @property
    def null_label(self) -> int:
        return len(self.prompts)  # the empty prompt's row of the table

    def check_labels(self, labels, where: str) -> None:
        """``ValueError`` naming ``where`` (the dataset) if a label has no prompt."""
        labels = np.asarray(labels)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.prompts)):
            raise ValueError(f"{where}: labels {int(labels.min())}..{int(labels.max())} do not fit the "
                             f"{len(self.prompts)} conditioning.prompts (labels 0..{len(self.prompts) - 1})")

    def encoder_hidden_size(self) -> int | None:
        """The encoder's embedding width from its config.json, where ``text_encoder`` is a local
        folder (None otherwise: a hub id is not fetched to check a config). Reads no weights."""
        folder = Path(self.text_encoder).expanduser()
        for config in (folder / TEXT_ENCODER_SUBFOLDER / "config.json", folder / "config.json"):
            if config.is_file():
                try:
                    return int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"])
                except (OSError, ValueError, KeyError, TypeError):
                    return None
        return None

    def _encoder(self):
        """(tokenizer, text model, sha256 of its weights), loaded once."""
        if "encoder" not in self._loaded:
            self._loaded["encoder"] = load_text_encoder(self.text_encoder)
        return self._loaded["encoder"]

    def _table(self, device=None) -> torch.Tensor:
        """(len(prompts) + 1, L, D) float32: each prompt's embedding, the empty prompt's last."""
        if "table" not in self._loaded:
            tokenizer, model, _ = self._encoder()
            self._loaded["table"] = embed_texts(tokenizer, model, [*self.prompts, EMPTY_PROMPT])
        if device is None:
            return self._loaded["table"]
        key = ("table", str(device))  # one copy per device: training indexes it every step
        if key not in self._loaded:
            self._loaded[key] = self._loaded["table"].to(device)
        return self._loaded[key]

    def _embeddings(self, index: torch.Tensor, device=None) -> torch.Tensor:
        return self._table(device)[index.to(device)]

    def data_condition(self, labels, device=None) -> torch.Tensor:
        """(n, L, D): the images' own captions' embeddings (pruning; no dropout)."""
        import torch

        return self._embeddings(torch.as_tensor(np.asarray(labels), dtype=torch.long), device)

    def training_condition(self, labels, generator: torch.Generator, device=None) -> torch.Tensor:
        """The batch's captions' embeddings, each the empty prompt's with probability ``drop_prob``
        (one uniform draw per image from ``generator``, drawn as :class:`ClassLabels` draws)."""
        import torch

        index = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)
        return self._embeddings(dropped_to_null(index, self.null_label, self.drop_prob, generator), device)

    def sampling_condition(self, seeds, device=None) -> torch.Tensor:
        """The image of seed s: prompts[s mod len(prompts)] (a function of its seed alone, like its
        noise, as :meth:`ClassLabels.sampling_condition`)."""
        import torch

        return self._embeddings(torch.as_tensor(np.asarray(seeds), dtype=torch.long).remainder(len(self.prompts)),
                                device)

    def sampling_prompts(self, seeds) -> list[str]:
        """The prompt of the image of seed s: prompts[s mod len(prompts)], the caption whose
        embedding :meth:`sampling_condition` gives it (what its CLIP score compares it with)."""
        return [self.prompts[int(seed) % len(self.prompts)] for seed in np.asarray(seeds).reshape(-1)]

    def null_like(self, condition: torch.Tensor) -> torch.Tensor:
        """The empty prompt's embedding for each row of ``condition`` (its device and dtype)."""
        empty = self._table(condition.device)[self.null_label].to(condition.dtype)
        return empty.expand(len(condition), *empty.shape)

    def describe(self) -> dict:
        """What the samples' metadata and the FID JSON record (loads the encoder)."""
        tokenizer, _, digest = self._encoder()
        return {"kind": self.kind, "text_encoder": self.text_encoder, "prompts": list(self.prompts),
                "drop_prob": self.drop_prob, "max_length": tokenizer.model_max_length,
                "text_encoder_sha256": digest,
                "sampling_prompts": "the image of seed s: prompts[s mod len(prompts)]"}

    def identity(self) -> bytes:
        """Bytes naming the conditioning in training fingerprints: the settings, the encoder's weight
        digest and the prompts' token ids (a changed encoder or tokenizer is another run)."""
        tokenizer, _, digest = self._encoder()
        tokens = tokenizer([*self.prompts, EMPTY_PROMPT], padding="max_length",
                           max_length=tokenizer.model_max_length, truncation=True).input_ids
        return json.dumps({"kind": self.kind, "prompts": list(self.prompts), "drop_prob": self.drop_prob,
                           "text_encoder_sha256": digest, "tokens": tokens}, sort_keys=True).encode()


@dataclass(frozen=True)
class Captions:
    """Each image captioned by its own text: the image store's captions (igsm.data.mscoco, whose labels
    are the captions' positions in the store), embedded as :class:`TextPrompts` embeds its prompts
    (the frozen CLIP text encoder ``text_encoder``'s last hidden state, padded to its max length; the
    empty prompt is the null of guidance, a dropped caption drawn with ``drop_prob`` as labels are).

    Embeddings are computed per batch, on the batch's device, by the job (SD trains so): a caption set
    has up to 118k distinct texts, and a stored 77×768 float embedding per image would be 28 GB for
    COCO train. The captions are bound from the store a job reads (:meth:`for_data`: training and
    pruning), so the store's fingerprint identifies them.

    Sampling: the image of seed s gets ``prompts[s mod n]``, where ``prompts`` are the first
    ``num_prompts`` (0: all) captions of ``prompts_dataset``'s store (default: the experiment's own
    dataset) in a permutation drawn with ``prompt_seed`` — the evaluation's prompt subset (e.g. 5k COCO
    val captions), fixed by seed and recorded (:meth:`describe`). ``prompt_store`` is that store's
    folder, which the workflow fills in (a job input), not a config key.
    """

    text_encoder: str
    drop_prob: float = 0.1
    prompts_dataset: str = ""
    num_prompts: int = 0
    prompt_seed: int = 0
    prompt_store: str = ""
    kind = "captions"
    # Read by sampling alone: training and pruning jobs do not get them (a new prompt subset reruns
    # the sampling, not the finetunes: sampling_section / training_section).
    sampling_keys = ("prompts_dataset", "num_prompts", "prompt_seed", "prompt_store")

    def prompt_dataset(self, dataset: str) -> str:
        """The dataset whose captions prompt the samples (``dataset``: the experiment's)."""
        return self.prompts_dataset or dataset

    def __post_init__(self):
        _check_text_settings(self.text_encoder, self.drop_prob)
        if not isinstance(self.num_prompts, int) or self.num_prompts < 0:
            raise ValueError(f"conditioning.num_prompts: {self.num_prompts!r}, must be ≥ 0 (0: every caption)")
        object.__setattr__(self, "_loaded", {})  # encoder, captions, prompts: on first use

    # What the config alone shows, the encoder's width and the encoder itself: as for prompts per label.
    config_errors = TextPrompts.config_errors
    encoder_hidden_size = TextPrompts.encoder_hidden_size
    _encoder = TextPrompts._encoder

    def for_data(self, images) -> "Captions":
        """This conditioning with the captions of the store ``images`` (``ValueError`` naming the
        dataset if it has none); the encoder already loaded is shared."""
        captions = getattr(images, "captions", None)
        if captions is None:
            where = getattr(images, "directory", "the training images")
            raise ValueError(f"dataset {where}: no captions, but conditioning.kind captions reads each image's "
                             f"own (source mscoco stores them; kind text captions labels with prompts)")
        bound = dataclasses.replace(self)
        bound._loaded.update({k: v for k, v in self._loaded.items() if k != "captions"})
        bound._loaded["captions"] = captions
        return bound

    @property
    def _captions(self) -> list:
        if "captions" not in self._loaded:
            raise RuntimeError("Captions: bind the data's captions first (for_data)")
        return self._loaded["captions"]

    @property
    def null_label(self) -> int:
        return len(self._captions)  # one past the captions: the empty prompt

    def check_labels(self, labels, where: str) -> None:
        """``ValueError`` naming ``where`` if a label is not a caption's position."""
        labels = np.asarray(labels)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self._captions)):
            raise ValueError(f"{where}: labels {int(labels.min())}..{int(labels.max())} are not positions of its "
                             f"{len(self._captions)} captions")

    def embed(self, texts, device=None) -> torch.Tensor:
        """(n, L, D) float32 on ``device``: each text's embedding (:func:`embed_texts`)."""
        tokenizer, model, _ = self._encoder()
        return embed_texts(tokenizer, model, texts, device)

    def _texts(self, index) -> list:
        captions = self._captions
        return [captions[i] if i < len(captions) else EMPTY_PROMPT for i in np.asarray(index).tolist()]

    def data_condition(self, labels, device=None) -> torch.Tensor:
        """(n, L, D): the images' own captions' embeddings (pruning; no dropout)."""
        return self.embed(self._texts(labels), device)

    def training_condition(self, labels, generator: torch.Generator, device=None) -> torch.Tensor:
        """The batch's captions' embeddings, each the empty prompt's with probability ``drop_prob``
        (the draws of every kind: :func:`dropped_to_null`)."""
        import torch

        index = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)
        return self.embed(self._texts(dropped_to_null(index, self.null_label, self.drop_prob, generator).cpu()),
                          device)

    def _prompts(self) -> dict:
        """{"prompts": the sampling prompts, "store": the prompt store's fingerprint}, read once."""
        if "prompts" not in self._loaded:
            from igsm.data import load_images

            if not self.prompt_store:
                raise ValueError("conditioning.prompt_store: not given (the workflow passes the store of "
                                 "conditioning.prompts_dataset to the jobs that sample)")
            store = load_images(self.prompt_store)
            captions = store.captions
            if captions is None:
                raise ValueError(f"conditioning.prompts_dataset: dataset {self.prompt_store} has no captions "
                                 f"(source mscoco stores them)")
            count = self.num_prompts or len(captions)
            if count > len(captions):
                raise ValueError(f"conditioning.num_prompts: {count}, but dataset {self.prompt_store} has "
                                 f"{len(captions)} captions")
            order = np.random.default_rng(self.prompt_seed).permutation(len(captions))[:count]
            self._loaded["prompts"] = {"prompts": [captions[i] for i in order.tolist()],
                                       "store": store.fingerprint()}
        return self._loaded["prompts"]

    def sampling_prompts(self, seeds) -> list:
        """The prompt of the image of seed s: prompts[s mod n] (a function of its seed alone)."""
        prompts = self._prompts()["prompts"]
        return [prompts[int(seed) % len(prompts)] for seed in np.asarray(seeds).tolist()]

    def sampling_condition(self, seeds, device=None) -> torch.Tensor:
        return self.embed(self.sampling_prompts(seeds), device)

    def null_like(self, condition: torch.Tensor) -> torch.Tensor:
        """The empty prompt's embedding for each row of ``condition`` (its device and dtype)."""
        if ("null", str(condition.device)) not in self._loaded:
            self._loaded[("null", str(condition.device))] = self.embed([EMPTY_PROMPT], condition.device)[0]
        empty = self._loaded[("null", str(condition.device))].to(condition.dtype)
        return empty.expand(len(condition), *empty.shape)

    def describe(self) -> dict:
        """What the samples' metadata and the FID JSON record (loads the encoder and the prompts)."""
        tokenizer, _, digest = self._encoder()
        prompts = self._prompts()
        return {"kind": self.kind, "text_encoder": self.text_encoder, "text_encoder_sha256": digest,
                "drop_prob": self.drop_prob, "max_length": tokenizer.model_max_length,
                "prompts_dataset": self.prompts_dataset, "prompt_store_fingerprint": prompts["store"],
                "num_prompts": len(prompts["prompts"]), "prompt_seed": self.prompt_seed,
                "sampling_prompts": "the image of seed s: prompts[s mod num_prompts], the prompts the first "
                                    "num_prompts captions of prompts_dataset in a permutation drawn with "
                                    "prompt_seed (numpy default_rng)"}

    def identity(self) -> bytes:
        """Bytes naming the conditioning in training fingerprints: its settings, the encoder's weight
        digest and its tokenizer's vocabulary (the captions are in the store's fingerprint)."""
        tokenizer, _, digest = self._encoder()
        vocabulary = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        return json.dumps({"kind": self.kind, "drop_prob": self.drop_prob, "text_encoder_sha256": digest,
                           "tokenizer_vocabulary_sha256": vocabulary,
                           "max_length": tokenizer.model_max_length}, sort_keys=True).encode()


def _check_text_settings(text_encoder, drop_prob) -> None:
    """The settings every text kind has: an encoder named, a dropout probability in [0, 1)."""
    if not isinstance(text_encoder, str) or not text_encoder.strip():
        raise ValueError(f"conditioning.text_encoder: {text_encoder!r}, must name a folder or hub id "
                         f"holding a CLIP text encoder and tokenizer")
    if not 0 <= drop_prob < 1:
        raise ValueError(f"conditioning.drop_prob: {drop_prob}, must be in [0, 1)")


def embed_texts(tokenizer, model, texts, device=None) -> torch.Tensor:
    """(n, L, D) float32 on ``device`` (default the CPU): the text encoder's last hidden state of each
    text padded to the tokenizer's max length, as Stable Diffusion conditions its U-Net; each distinct
    text encoded once. The encoder is moved to ``device`` (a no-op once there)."""
    import torch

    device = torch.device("cpu" if device is None else device)
    model.to(device)
    distinct = list(dict.fromkeys(texts))
    tokens = tokenizer(distinct, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    with torch.no_grad():  # SD 1.5 passes no attention mask: CLIP's causal mask alone
        states = model(input_ids=tokens.input_ids.to(device)).last_hidden_state.float()
    return states[[distinct.index(text) for text in texts]]


def load_text_encoder(source: str):
    """(CLIPTokenizer, CLIPTextModel in eval mode, sha256 of its weights) from a local folder or a
    hub id, either at its top level or in a pipeline's text_encoder/ and tokenizer/ subfolders, the
    hub asked only where it answers (igsm.hub); ``ValueError`` naming conditioning.text_encoder and
    what to do otherwise (a folder made by :func:`save_tiny_text_encoder` offline)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from igsm.hub import load_local_or_hub

    key = "conditioning.text_encoder"
    tokenizer = load_local_or_hub(CLIPTokenizer.from_pretrained, source, subfolders=("", TOKENIZER_SUBFOLDER),
                                  key=key, what="CLIP tokenizer", marker="tokenizer_config.json")
    model = load_local_or_hub(CLIPTextModel.from_pretrained, source, subfolders=("", TEXT_ENCODER_SUBFOLDER),
                              key=key, what="CLIP text encoder")
    model.eval().requires_grad_(False)  # frozen: an input of the diffusion networks, never trained
    return tokenizer, model, weights_digest(model)


def weights_digest(model) -> str:
    """sha256 of a network's tensors (names, dtypes, shapes, values), whatever file held them."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, any dtype
    return digest.hexdigest()


def save_tiny_text_encoder(folder, prompts, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                           seed: int = 0, max_length: int = 77) -> Path:
    """Write a random-initialised CLIPTextModel (transformers' CLIPTextConfig, tiny) and a
    CLIPTokenizer built here (:func:`tiny_tokenizer`), into ``folder`` (both at its top level),
    with ``save_pretrained``: a text encoder for tests and toy configs, made offline (no hub, no
    weights downloaded). ``max_length``: the padded prompt length (CLIP's 77)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer, vocab_size = tiny_tokenizer(folder, prompts, max_length)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_tokenizer(folder, prompts, max_length: int = 77):
    """(a CLIPTokenizer whose vocabulary and merges are written to ``folder``, its vocabulary size):
    the tokenizer of the tiny CLIP models made offline (:func:`save_tiny_text_encoder`; the tiny
    CLIP of igsm.clip_score), not yet saved with ``save_pretrained``.

    The vocabulary is CLIP's byte-level alphabet (each of the 256 byte characters, alone and ending
    a word) with BPE merges that build every word of ``prompts`` whole, so any text encodes without
    unknown tokens and the prompts' words are single tokens, as in CLIP's own vocabulary.
    ``max_length``: the tokenizer's model_max_length (CLIP's 77)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*alphabet, *(c + "</w>" for c in alphabet),
                                                 "<|startoftext|>", "<|endoftext|>"])}

    def tokenizer_with(merges):
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)

    # The words as CLIP's tokenizer splits them (its normalizer and pre-tokenizer: lower case, letter
    # runs, single digits, punctuation runs, byte-level characters).
    backend = tokenizer_with([]).backend_tokenizer
    words = sorted({word for prompt in prompts
                    for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(prompt))})
    merges = []
    for word in words:  # merge left to right: c·a → ca, ca·t</w> → cat</w>
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    tokenizer = tokenizer_with(list(dict.fromkeys(merges)))
    unknown = [p for p in prompts if tokenizer.unk_token in tokenizer.tokenize(p)]
    if unknown:  # cannot happen with the whole byte alphabet in the vocabulary; a tokenizer change would show
        raise RuntimeError(f"the tiny tokenizer encodes {unknown} with unknown tokens")
    return tokenizer, len(vocab)


_KINDS: dict[str, type] = {}


def register(cls: type) -> type:
    """Add a conditioning kind (a class with the interface above) under ``cls.kind``."""
    if cls.kind == NONE:
        raise ValueError(f"conditioning kind {NONE!r} means unconditional: {cls.__qualname__} needs another name")
    if cls.kind in _KINDS:
        raise registered_twice("conditioning kind", cls.kind, f"the name {cls.kind!r}", _KINDS[cls.kind], cls)
    _KINDS[cls.kind] = cls
    return cls


register(ClassLabels)
register(TextPrompts)
register(Captions)


def kinds() -> list[str]:
    """The values of ``conditioning.kind``: ``none`` and every registered kind."""
    return [NONE, *_KINDS]


def conditioning_from_settings(settings: dict | None):
    """The conditioning of an experiment's ``conditioning`` section (None: unconditional)."""
    settings = dict(settings or {})
    kind = settings.pop("kind", NONE)
    if kind == NONE:
        return None
    if kind not in _KINDS:
        raise ValueError(f"conditioning.kind: unknown {kind!r}; choose one of {kinds()}")
    import dataclasses

    fields = dataclasses.fields(_KINDS[kind])
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in settings]
    unknown = sorted(set(settings) - set(names))
    if missing or unknown:
        key, what = (missing[0], "required") if missing else (unknown[0], "not a key")
        raise ValueError(f"conditioning.{key}: {what} for kind {kind!r} (its keys: {', '.join(names)})")
    return _KINDS[kind](**settings)


def training_section(section: dict) -> dict:
    """An experiment's ``conditioning`` section as the jobs that train or prune get it: without the
    keys only sampling reads (a kind's ``sampling_keys``)."""
    kind = conditioning_from_settings(section)
    return {k: v for k, v in section.items() if k not in getattr(kind, "sampling_keys", ())}


def sampling_section(section: dict, dataset: str, store_of) -> tuple[dict, str | None]:
    """(the section as sampling jobs get it, the store they read prompts from or None): a kind that
    prompts samples with a dataset's captions gets that dataset's store folder (``store_of(name)``,
    a job input) as ``prompt_store``; ``dataset``: the experiment's."""
    kind = conditioning_from_settings(section)
    if not hasattr(kind, "prompt_dataset"):
        return section, None
    store = store_of(kind.prompt_dataset(dataset))
    return {**section, "prompt_store": store}, store


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε̂_∅ + w·(ε̂_c − ε̂_∅)."""
    return unconditional + scale * (conditional - unconditional)
