"""
The data path of tinyllava: from a LLaVA-format JSON file to the tensors a training step eats.

A sample is a conversation, optionally about one image:

    {"id": "0001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the cat doing?"},
                       {"from": "gpt",   "value": "Sleeping on a sofa."}]}

1. A conversation template (plain, vicuna_v1, chatml) writes the turns out as text with role marks.
2. The text is tokenized segment by segment, so every token is born knowing whether it is trained.
   Two conventions, shared with tinyllava.py and with the original LLaVA:
   - `<image>` becomes ONE id, IMAGE_TOKEN_INDEX = -200. No real token has a negative id, so it
     cannot collide with text; the model later replaces it by the image's N patch embeddings.
   - labels are the ids where the model should learn to predict the token, IGNORE_INDEX = -100
     everywhere else (system prompt, user turns, role markers, image, padding): -100 is the value
     PyTorch's cross-entropy skips by default. Labels align with the ids; the model shifts them.
3. The image is converted to RGB, padded to a square (or cropped), resized and normalised by hand,
   exactly as the encoder's own HF image processor would (tests check this against transformers).
4. A dataset reads the JSON lazily (images are opened in __getitem__), and `collate` pads a batch.

Also here: a mask viewer (`python data.py show ...`) to *see* which tokens are trained. The
synthetic shapes data set that the offline pipeline trains on lives apart, in offline/shapes.py.
"""

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import tokenizers
import torch
from PIL import Image
from tqdm import tqdm

from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, InputError, command_line

IMAGE_TAG = "<image>"


class DataError(InputError):
    """Bad input data; the message names the file and the sample."""


class TooLong(ValueError):
    """A conversation that cannot be truncated to max_len and still be worth training on."""


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)

# -----------------------------------------------------------------------------
# Tokenizer: a checkpoint's tokenizer.json, read with the `tokenizers` library


class Tokenizer:
    """Thin wrapper around tokenizers.Tokenizer that knows its special ids.

    `encode` never adds special tokens: conversations are tokenized piece by piece and the BOS must
    appear once at the start of the sequence, not before every piece; tokenize_conversation adds it
    when `add_bos` says this tokenizer's model expects one (Llama does, SmolLM2 and Qwen2 do not).
    """

    def __init__(self, tok, bos_id, eos_id, pad_id, add_bos):
        self.tok, self.add_bos = tok, add_bos
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # SentencePiece-style tokenizers (Llama 2) put a space marker in front of every text they
        # encode; for them a segment " answer" must be encoded as "answer" or it gets two spaces.
        self.prefix_space = tok.encode("a", add_special_tokens=False).tokens[0].startswith("\u2581")

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        """encode() of many texts at once, on all cores: the same ids, far faster than one by one."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        """Text of the ids, special tokens included; the image placeholder reads as <image>."""
        pieces = [[]]
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                pieces.append([])
            else:
                pieces[-1].append(i)
        return IMAGE_TAG.join(self.tok.decode(p, skip_special_tokens=False) for p in pieces)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()


def load_tokenizer(path):
    """Load tokenizer.json from a checkpoint folder and find BOS/EOS/PAD.

    Token strings come from tokenizer_config.json / special_tokens_map.json (plain strings or
    {"content": ...} dicts); ids from config.json (or its text_config) and generation_config.json
    fill gaps. No pad token: we pad with EOS (else UNK, else 0); padding is masked, any id works.
    """
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise InputError(f"no tokenizer.json in {path!r}")
    tok = tokenizers.Tokenizer.from_file(file)
    cfg = {**_read_json(os.path.join(path, "special_tokens_map.json")),
           **_read_json(os.path.join(path, "tokenizer_config.json"))}
    model_cfg = _read_json(os.path.join(path, "config.json"))
    model_cfg = {**model_cfg.get("text_config", model_cfg),
                 **_read_json(os.path.join(path, "generation_config.json"))}

    def special(name):
        token = cfg.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        tid = tok.token_to_id(token) if token else None
        if tid is None:
            tid = model_cfg.get(f"{name}_token_id")
            tid = tid[0] if isinstance(tid, list) else tid  # eos may be a list: take the first
        return tid

    bos, eos, pad, unk = special("bos"), special("eos"), special("pad"), special("unk")
    pad = next((i for i in (pad, eos, unk) if i is not None), 0)
    # Trust the config's add_bos_token; without it, ask the post-processor whether it prepends BOS.
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:
        add_bos = bos is not None and tok.encode("a").ids[:1] == [bos]
    return Tokenizer(tok, bos_id=bos, eos_id=eos, pad_id=pad,
                     add_bos=bool(add_bos and bos is not None))

# -----------------------------------------------------------------------------
# Conversation templates: how turns are written out as text


@dataclass(frozen=True)
class Template:
    name: str
    system: str              # default system prompt, when the conversation brings none ("" = none)
    system_fmt: str          # how a system prompt is written
    user_fmt: str            # a user turn, ending with the cue that hands over to the assistant
    answer_fmt: str          # an assistant answer: these tokens are trained
    end: str | None          # closes every answer, trained so the model learns to stop; None = EOS
    after_end: str = ""      # text after the end token (not trained), e.g. chatml's newline
    keep_user_text: bool = True  # plain drops the user's words: stage 1 learns image -> caption


VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the human's questions.")

TEMPLATES = {
    # LLaVA's stage 1 (preprocess_plain): "<image>caption<end>". LLaVA ends with "\n"; we use EOS
    # so a stage-1 model also knows when to stop.
    "plain": Template("plain", system="", system_fmt="", user_fmt="{}", answer_fmt="{}", end=None,
                      keep_user_text=False),
    # LLaVA-1.5: "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM, system_fmt="{} ",
                          user_fmt="USER: {} ASSISTANT:", answer_fmt=" {}", end=None),
    # Qwen2 / SmolLM2-Instruct: "<|im_start|>role\n...<|im_end|>\n"
    "chatml": Template("chatml", system="You are a helpful assistant.",
                       system_fmt="<|im_start|>system\n{}<|im_end|>\n",
                       user_fmt="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
                       answer_fmt="{}", end="<|im_end|>", after_end="\n"),
}


def get_template(template):
    """A Template from its name (or the Template itself)."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise InputError(f"unknown template {template!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]

# -----------------------------------------------------------------------------
# Tokenization with masks, and truncation


def image_first(text):
    """A human turn with the image: the tag goes first, on a line of its own, wherever (or whether)
    the user wrote it, as LLaVA does."""
    return IMAGE_TAG + "\n" + text.replace(IMAGE_TAG, "").strip()


def with_image_tag(conversations):
    """A copy of the turns with the image tag in the first human turn: the form for a sample that
    has an image but whose text never mentions it."""
    turns = [dict(t) for t in conversations]
    if not any(IMAGE_TAG in t["value"] for t in turns):
        human = next((t for t in turns if t["from"] == "human"), None)
        if human is not None:
            human["value"] = image_first(human["value"])
    return turns


def tokenize_conversation(conversations, tokenizer, template, max_len=None,
                          add_generation_prompt=False):
    """Turn [{"from": "system"|"human"|"gpt", "value": ...}, ...] into (input_ids, labels).

    Each piece of the template is tokenized on its own and its labels are decided right there: the
    answers and their end tokens keep their ids, everything else gets IGNORE_INDEX. LLaVA instead
    tokenizes the whole text and then masks by *counting* the tokens of each part; when a tokenizer
    merges tokens across a part boundary the counts drift ("tokenization mismatch") and the mask is
    silently wrong. Here the ids and the mask come from the same tokens, so they cannot disagree.

    With add_generation_prompt=True the conversation must end with a human turn, and the ids stop
    at the assistant's cue: the inference prompt is built by the code that built the training data.
    """
    pieces = conversation_pieces(conversations, tokenizer, template, add_generation_prompt)
    ids, labels = assemble(pieces, [tokenizer.encode(p) for p, _ in pieces if isinstance(p, str)])
    return (ids, labels) if max_len is None else truncate(ids, labels, max_len)


def conversation_pieces(conversations, tokenizer, template, add_generation_prompt=False):
    """The conversation as the template writes it, cut where the mask changes: [(piece, trained)],
    a piece being a text to tokenize or one id (BOS, an end token, the image's -200)."""
    tpl = get_template(template)
    turns = list(conversations)
    system = turns.pop(0)["value"] if turns and turns[0]["from"] == "system" else tpl.system
    roles = [t["from"] for t in turns]
    expected = ["human", "gpt"] * (len(turns) // 2 + 1)
    if not turns or roles != expected[:len(turns)]:
        raise ValueError("roles must alternate human, gpt, human, ... (after an optional system "
                         f"turn); got {roles}")
    if roles[-1] != ("human" if add_generation_prompt else "gpt"):
        raise ValueError("a training conversation must end with a gpt answer, "
                         "a generation prompt with a human turn")
    tags = [t["value"].count(IMAGE_TAG) for t in turns]
    if sum(tags) > 1 or sum(tags[1:]) or IMAGE_TAG in system:
        raise ValueError(f"at most one {IMAGE_TAG} tag, in the first human turn "
                         "(one image per sample)")
    if tokenizer.eos_id is None and tpl.end is None:
        raise ValueError(f"template {tpl.name} ends answers with EOS, "
                         "but the tokenizer has no EOS token")
    end_id = tokenizer.eos_id if tpl.end is None else tokenizer.token_to_id(tpl.end)
    if end_id is None:
        raise ValueError(f"template {tpl.name} needs {tpl.end!r} to be a single token "
                         "of the tokenizer")

    pieces = []

    def add(piece, trained):
        if isinstance(piece, int):
            pieces.append((piece, trained))
            return
        for k, text in enumerate(piece.split(IMAGE_TAG)):  # text, -200, text: tokenizer_image_token
            if k:
                pieces.append((IMAGE_TOKEN_INDEX, trained))
            if tokenizer.prefix_space and text.startswith(" "):
                text = text[1:]
            if text:
                pieces.append((text, trained))

    if tokenizer.add_bos:
        add(tokenizer.bos_id, False)
    # Masked text piles up in `prompt` until an answer comes, then is tokenized in one go: the only
    # forced token boundaries are where an answer starts and ends (and around the image).
    prompt = tpl.system_fmt.format(system) if system else ""
    for turn in turns:
        text = turn["value"]
        if turn["from"] == "human":
            if IMAGE_TAG in text:
                text = image_first(text)
            if not tpl.keep_user_text:
                text = IMAGE_TAG if IMAGE_TAG in text else ""
            prompt += tpl.user_fmt.format(text)
        else:
            add(prompt, False)
            add(tpl.answer_fmt.format(text), True)
            add(end_id, True)
            prompt = tpl.after_end
    add(prompt, False)
    return pieces


def assemble(pieces, encoded):
    """(input_ids, labels) of conversation_pieces, its texts' ids given in order: a trained piece keeps
    its ids as labels, any other is IGNORE_INDEX."""
    ids, labels, texts = [], [], iter(encoded)
    for piece, trained in pieces:
        chunk = [piece] if isinstance(piece, int) else next(texts)
        ids.extend(chunk)
        labels.extend(chunk if trained else [IGNORE_INDEX] * len(chunk))
    return ids, labels


def build_prompt(conversations, tokenizer, template):
    """Ids of the inference prompt for a conversation that ends with a human turn."""
    return tokenize_conversation(conversations, tokenizer, template, add_generation_prompt=True)[0]


def truncate(ids, labels, max_len):
    """Keep the first max_len tokens. The image placeholder counts as one id here; the model turns
    it into N patch embeddings, so a trainer with context C should pass max_len = C - N + 1.

    Raises TooLong if the cut would drop the image placeholder (the image would be loaded but never
    seen) or leave no trained token (a loss of 0/0 = NaN). Callers skip and count such samples."""
    if len(ids) <= max_len:
        return ids, labels
    if IMAGE_TOKEN_INDEX in ids[max_len:]:
        raise TooLong(f"max_len={max_len} would cut the image placeholder")
    if all(label == IGNORE_INDEX for label in labels[:max_len]):
        raise TooLong(f"max_len={max_len} leaves no trained token")
    return ids[:max_len], labels[:max_len]

# -----------------------------------------------------------------------------
# Images: any PIL image -> normalised (3, size, size) tensor, by hand

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageConfig:
    size: int  # side of the square the encoder sees
    mean: tuple  # per-channel mean of the encoder's training pixels, in [0, 1]
    std: tuple  # per-channel std, likewise
    mode: str = "pad"  # to a square by "pad" (LLaVA-1.5), "crop" (CLIP) or "squash" (SigLIP)


LLAVA_IMAGE = ImageConfig(336, CLIP_MEAN, CLIP_STD)  # LLaVA-1.5's: CLIP-L/14-336, padded


@dataclass
class ChatConfig:
    """How to talk to a model as it was trained; stored in its config.json (TinyLlava.chat)."""

    template: str  # conversation template name
    image: ImageConfig  # image preprocessing

    @classmethod
    def from_dict(cls, d):
        return cls(template=d["template"], image=ImageConfig(**d["image"]))


def load_image_processor_config(path):
    """The image settings of a checkpoint's own processor (preprocessor_config.json; mode "crop" for
    CLIP, "squash" for SigLIP); without one, the CLIP or SigLIP defaults (chosen by config.json's
    model_type) and config.json's image_size."""
    p = _read_json(os.path.join(path, "preprocessor_config.json"))
    cfg = _read_json(os.path.join(path, "config.json"))
    vision = cfg.get("vision_config", cfg)
    siglip = "siglip" in (p.get("image_processor_type", "") + vision.get("model_type", "")).lower()
    mean = tuple(p.get("image_mean", SIGLIP_MEAN if siglip else CLIP_MEAN))
    std = tuple(p.get("image_std", SIGLIP_STD if siglip else CLIP_STD))
    size = p.get("size", vision.get("image_size", 224))

    def side(s):
        return s if isinstance(s, int) else s.get("shortest_edge", s.get("height"))

    if p.get("do_center_crop", not siglip):  # CLIP: resize the shortest edge, then centre-crop
        return ImageConfig(side(p.get("crop_size", size)), mean, std, "crop")
    return ImageConfig(side(size), mean, std, "squash")  # SigLIP: straight to size x size


def to_rgb(image):
    """Any PIL mode -> RGB; transparency is composited on white, as transformers does, not black."""
    if image.mode.startswith("I"):  # 16/32-bit greyscale: scale to 8 bits (convert clips at 255)
        pixels = (np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8)
        image = Image.fromarray(pixels)
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def preprocess_image(image, size, mean, std, mode="pad"):
    """PIL image -> float tensor (3, size, size), normalised for the vision encoder.

    mode "pad":    LLaVA-1.5's expand2square: pad to a square with the mean colour (normalised to
                   ~0, so the padding looks like "nothing"), then resize: the whole image is kept.
    mode "crop":   CLIP's processor: shortest side resized to `size`, centre-crop: edges are lost.
    mode "squash": SigLIP's processor: resize straight to size x size: the aspect ratio is lost.
    """
    image = to_rgb(image)
    w, h = image.size
    if mode == "pad" and w != h:
        square = Image.new("RGB", (max(w, h),) * 2, tuple(int(x * 255) for x in mean))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image = square
    if mode == "crop":
        scale = size / min(w, h)  # the long side is truncated to an int, as transformers does
        nw, nh = (size, int(h * scale)) if w <= h else (int(w * scale), size)
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif mode in ("pad", "squash"):
        image = image.resize((size, size), Image.BICUBIC)
    else:
        raise InputError(f"unknown image mode {mode!r}; use 'pad', 'crop' or 'squash'")
    x = np.asarray(image, dtype=np.float32) / 255.0  # (size, size, 3) in [0, 1]
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # (3, size, size)

def load_image(file, image, where=None):
    """An image file, prepared as ImageConfig `image` says: (3, size, size). One that cannot be read is
    a DataError naming it, after `where` (the data file and sample) if given."""
    try:
        with Image.open(file) as im:
            return preprocess_image(im, image.size, image.mean, image.std, image.mode)
    except OSError as e:
        raise DataError((f"{where}: " if where else "") + f"cannot read image {file}: {e}") from None

# -----------------------------------------------------------------------------
# Datasets and batching


def load_samples(path, check=True):
    """Read a LLaVA JSON list or a JSONL file; each sample gets an id. check: raise on the first
    sample whose structure is wrong (schema_problem)."""
    with open(path) as f:
        text = f.read()
    name = os.path.basename(path)
    if path.endswith(".jsonl"):
        samples = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                if line.strip():
                    samples.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{name}: line {n}: malformed JSON: {e.msg}") from None
    else:
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: malformed JSON at line {e.lineno}, column {e.colno}: "
                            f"{e.msg}") from None
        if not isinstance(samples, list):
            raise DataError(f"{name}: expected a JSON list of samples")
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise DataError(f"{name}: sample #{i}: expected an object, got {type(s).__name__}")
        s.setdefault("id", f"#{i}")
        if check and (problem := schema_problem(s)):
            raise DataError(f"{name}: sample {s['id']}: {problem}")
    return samples


def schema_problem(sample):
    """What is wrong with a sample's structure, or None."""
    convs = sample.get("conversations")
    if not isinstance(convs, list) or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str)
            and t.get("from") in ("system", "human", "gpt") for t in convs):
        return 'needs \'conversations\': a list of {"from": "human"|"gpt"|"system", "value": str}'
    if "image" in sample and not isinstance(sample["image"], str):
        return "'image' must be one file name"
    return None


def tag_problem(sample):
    """More image tags than images (a sample has at most one image), or None."""
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in sample["conversations"])
    n_images = 1 if "image" in sample else 0
    return f"{n_tags} {IMAGE_TAG} tag(s) but {n_images} image(s)" if n_tags > n_images else None


def placed_turns(sample, image_folder):
    """(problem or None, image file or None, the turns with the image tag in place) of a sample whose
    structure is sound: what the data set and the check both ask of it before tokenizing."""
    if problem := tag_problem(sample):
        return problem, None, None
    if "image" not in sample:
        return None, None, sample["conversations"]
    file = os.path.join(image_folder, sample["image"])
    if not os.path.isfile(file):
        return f"image not found: {file}", None, None
    return None, file, with_image_tag(sample["conversations"])


def sample_problem(sample, tokenizer, template, image_folder, max_len=None):
    """Everything ConversationDataset and training would reject in one sample, or None: its structure,
    roles and image tags, a missing or undecodable image, no trained token left after truncation."""
    if problem := schema_problem(sample):
        return problem
    problem, file, convs = placed_turns(sample, image_folder)
    if problem:
        return problem
    if file is not None:
        try:
            with Image.open(file) as im:
                im.draft("RGB", (64, 64))  # JPEGs decode at a fraction of their size: fast, still a full read
                im.load()
        except OSError as e:
            return f"cannot read image: {file}: {e}"
    try:
        tokenize_conversation(convs, tokenizer, template, max_len=max_len)
    except ValueError as e:
        return str(e)
    return None


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format conversations, tokenized once up front, so bad samples are found before training
    starts: the text pieces of many samples go to the tokenizer in one call (on all cores), and the
    ids are kept in one int32 array (a few bytes a token, shared by forked loader workers as it is).
    Images are opened in __getitem__ and prepared as `image` says, looked up in image_folder (by
    default the data file's folder; absolute paths are kept). With a cache_dir, the tokenized arrays
    are saved there and loaded by the next run with the same file, tokenizer, template and max_len
    (a resumed run, the other DDP processes): it starts in seconds."""

    CHUNK = 8192  # samples tokenized per call
    CACHE_VERSION = 1  # raise when the tokenized arrays would come out differently for the same input

    def __init__(self, path, tokenizer, template, image=LLAVA_IMAGE, image_folder=None,
                 max_len=None, cache_dir=None):
        self.name, self.image = os.path.basename(path), image
        self.image_folder = (os.path.dirname(os.path.abspath(path)) if image_folder is None
                             else image_folder)
        template = get_template(template)
        cache = None
        if cache_dir is not None:
            key = [self.CACHE_VERSION, os.path.abspath(path), os.path.getsize(path), os.path.getmtime(path),
                   tokenizer.tok.to_str(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos,
                   repr(template), max_len, os.path.abspath(self.image_folder)]
            digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
            cache = os.path.join(cache_dir, f"{self.name}.{digest}.npz")
        if cache is not None and os.path.exists(cache):
            with np.load(cache) as f:
                self.tokens, self.trained, self.lengths = f["tokens"], f["trained"], f["lengths"]
                self.ids, self.images, self.skipped = f["ids"], f["images"], f["skipped"].tolist()
            print(f"{self.name}: {len(self.ids):,} samples, tokenized before ({cache})")
            # checked when tokenized: still there? Each file once (samples share images), with the
            # first sample that names it
            images, first = np.unique(self.images, return_index=True)
            for image, i in zip(images, first):
                if image and not os.path.isfile(image.decode()):
                    self._fail(self.ids[i].decode(), f"image not found: {image.decode()}")
        else:
            self._tokenize(load_samples(path), tokenizer, template, max_len)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        if self.skipped:
            total = len(self.skipped) + len(self.ids)
            print(f"{self.name}: skipped {len(self.skipped)} of {total} samples "
                  f"that do not fit max_len={max_len} (first ids: {self.skipped[:5]})")
        if cache is not None and not os.path.exists(cache):
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp.npz"  # each process its own: several may write at once
            np.savez(tmp, tokens=self.tokens, trained=self.trained, lengths=self.lengths,
                     ids=self.ids, images=self.images, skipped=np.array(self.skipped))
            os.replace(tmp, cache)  # atomic

    def _tokenize(self, samples, tokenizer, template, max_len):
        self.skipped, sample_ids, images = [], [], []
        tokens, trained, lengths = [], [], []
        for k in tqdm(range(0, len(samples), self.CHUNK), desc=f"tokenizing {self.name}",
                      disable=len(samples) <= self.CHUNK or not sys.stderr.isatty()):
            chunk = [(s, *self._pieces(s, tokenizer, template)) for s in samples[k : k + self.CHUNK]]
            encoded = iter(tokenizer.encode_batch([p for _, _, pieces in chunk for p, _ in pieces
                                                   if isinstance(p, str)]))
            for s, image, pieces in chunk:
                texts = [next(encoded) for p, _ in pieces if isinstance(p, str)]
                ids, labels = assemble(pieces, texts)
                try:
                    ids, labels = (ids, labels) if max_len is None else truncate(ids, labels, max_len)
                except TooLong:
                    self.skipped.append(str(s["id"]))
                    continue
                sample_ids.append(str(s["id"]))
                images.append(image or "")
                tokens.append(np.array(ids, dtype=np.int32))
                trained.append(np.array(labels) != IGNORE_INDEX)
                lengths.append(len(ids))
        self.tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        self.trained = np.concatenate(trained) if trained else np.zeros(0, bool)
        self.lengths = np.array(lengths, dtype=np.int64)  # ids per sample (the image counts as one)
        # ids and image files as UTF-8 bytes in numpy arrays, not Python strings: forked loader workers
        # then share them as they are, where reading a Python object would copy its memory page
        self.ids = np.array([x.encode() for x in sample_ids], dtype=bytes)
        self.images = np.array([x.encode() for x in images], dtype=bytes)  # b"": no image

    def _pieces(self, s, tokenizer, template):
        """(image file or None, conversation_pieces) of a raw sample; a bad one fails, naming it."""
        problem, image, convs = placed_turns(s, self.image_folder)
        if problem:
            self._fail(s["id"], problem)
        try:
            return image, conversation_pieces(convs, tokenizer, template)
        except ValueError as e:
            self._fail(s["id"], str(e))

    def _fail(self, sample_id, msg):
        raise DataError(f"{self.name}: sample {sample_id}: {msg}")

    @property
    def has_image(self):
        return [bool(image) for image in self.images]

    def __len__(self):
        return len(self.ids)

    def tokens_of(self, i):
        """(input_ids, labels) of sample i, as lists."""
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.tokens[a:b].tolist()
        return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, self.trained[a:b].tolist())]

    def __getitem__(self, i):
        ids, labels = self.tokens_of(i)
        pixel_values = None
        sample_id, image = self.ids[i].decode(), self.images[i].decode()
        if image:
            pixel_values = load_image(image, self.image, where=f"{self.name}: sample {sample_id}")
        return dict(id=sample_id, input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                    pixel_values=pixel_values)


def collate(batch, pad_id):
    """Right-pad samples into a batch, as DataLoader(..., collate_fn=partial(collate, pad_id=...)).

    Returns input_ids (B, T) padded with pad_id, labels (B, T) padded with IGNORE_INDEX so padding
    is never trained, attention_mask (B, T) 1 for real tokens, pixel_values (n_images, 3, H, W) for
    the samples that have an image, in batch order (None if none has), has_image (B,) bool, ids."""
    B, T = len(batch), max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = b["input_ids"], b["labels"], 1
    images = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=torch.stack(images) if images else None,  # (n_images, 3, H, W)
                has_image=torch.tensor([b["pixel_values"] is not None for b in batch]),
                ids=[b["id"] for b in batch])

# -----------------------------------------------------------------------------
# Mask viewer: see which tokens are trained

# bold green, dim, magenta
STYLES = {"trained": "\033[1;32m", "masked": "\033[2m", "image": "\033[1;35m"}
RESET = "\033[0m"


def render_mask(ids, labels, tokenizer, color=False):
    """The sequence as text with trained tokens in bold green (color) or in [brackets] (plain
    text), masked ones dim, the image placeholder as <image>; then the trained and masked counts."""
    def kind(pair):
        if pair[0] == IMAGE_TOKEN_INDEX:
            return "image"
        return "masked" if pair[1] == IGNORE_INDEX else "trained"

    parts = []
    for k, run in itertools.groupby(zip(ids, labels), key=kind):
        text = tokenizer.decode([i for i, _ in run])  # whole runs keep multi-byte characters whole
        parts.append(STYLES[k] + text + RESET if color else f"[{text}]" if k == "trained" else text)
    trained = sum(label != IGNORE_INDEX for label in labels)
    return "".join(parts) + f"\n({len(ids)} tokens: {trained} trained, {len(ids) - trained} masked)"


def show(path, tokenizer, template, n=3, image_folder=None, max_len=None, color=None):
    """Print the first n samples of a data file as the model will see them; colour on a terminal."""
    color = sys.stdout.isatty() if color is None else color
    template = get_template(template)
    legend = " ".join(STYLES[k] + k + RESET for k in STYLES) if color else "[trained] masked <image>"
    print(f"{os.path.basename(path)} · template {template.name} · {legend}")
    for s in load_samples(path)[:n]:
        head = f"── sample {s['id']} "
        if "image" in s:
            image = os.path.join(image_folder or os.path.dirname(os.path.abspath(path)), s["image"])
            head += f"· {s['image']}{'' if os.path.isfile(image) else ' (missing!)'} "
        print("\n" + head + "─" * max(0, 78 - len(head)))
        try:
            ids, labels = tokenize_conversation(s["conversations"], tokenizer, template, max_len)
            print(render_mask(ids, labels, tokenizer, color))
        except ValueError as e:
            print(f"cannot tokenize: {e}")

# -----------------------------------------------------------------------------
# CLI


def check(path, tokenizer_dir, template, image_folder=None, max_len=None, workers=None):
    """Check every sample of a data file as training would (sample_problem), on all cores; print each
    bad one by file and id, then the counts per problem. Returns the number of bad samples."""
    samples = load_samples(path, check=False)
    folder = os.path.dirname(os.path.abspath(path)) if image_folder is None else image_folder
    name, workers = os.path.basename(path), workers or os.cpu_count() or 1
    args = dict(tokenizer_dir=tokenizer_dir, template=template, image_folder=folder, max_len=max_len)
    chunks = [samples[k : k + 256] for k in range(0, len(samples), 256)]
    with multiprocessing.Pool(workers, initializer=_check_init, initargs=(args,)) as pool:
        results = tqdm(pool.imap(_check_chunk, chunks), total=len(chunks), desc=f"checking {name}",
                       disable=not sys.stderr.isatty())
        problems = [p for chunk in results for p in chunk]
    kinds = {}
    for s, problem in zip(samples, problems):
        if problem:
            print(f"{name}: sample {s['id']}: {problem}")
            kind = re.split("[:;]", problem)[0]  # the problem without its details
            kinds[kind] = kinds.get(kind, 0) + 1
    bad = sum(kinds.values())
    print(f"{name}: {len(samples) - bad} of {len(samples)} samples are good" + "".join(
        f"\n  {n:>7,}  {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    return bad


def _check_init(args):  # each worker process loads the tokenizer once
    global _CHECK
    _CHECK = dict(args, tokenizer=load_tokenizer(args.pop("tokenizer_dir")))


def _check_chunk(samples):
    return [sample_problem(s, **_CHECK) for s in samples]


def main(argv=None):
    parser = argparse.ArgumentParser(description="tinyllava data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("show", help="print samples with their trained tokens highlighted")
    p.add_argument("file")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--template", default="vicuna_v1", help=f"one of {', '.join(TEMPLATES)}")
    p.add_argument("-n", type=int, default=3, help="number of samples to show")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--max-len", type=int, default=None)
    p = sub.add_parser("check", help="find every sample that training would reject, on all cores")
    p.add_argument("file")
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    p.add_argument("--template", required=True, help=f"one of {', '.join(TEMPLATES)}")
    p.add_argument("--image-folder", default=None, help="default: the data file's folder")
    p.add_argument("--max-len", type=int, default=None,
                   help="training's max_len in ids (context - image tokens + 1): finds samples that "
                        "keep no trained token")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    if args.command == "show":
        show(args.file, load_tokenizer(args.tokenizer), args.template, n=args.n,
             image_folder=args.image_folder, max_len=args.max_len)
        return
    get_template(args.template)  # an unknown name fails here, before the workers start
    load_tokenizer(args.tokenizer)  # and so does a missing tokenizer
    bad = check(args.file, args.tokenizer, args.template, image_folder=args.image_folder,
                max_len=args.max_len, workers=args.workers)
    if bad:
        raise DataError(f"{args.file}: {bad} bad sample(s), listed above")


if __name__ == "__main__":
    command_line(main)
