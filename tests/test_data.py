"""
Tests for data.py: what the model is trained on is exactly what we think it is.

Proves that
- masks are right by construction: for every template and for two real tokenizer behaviours (a
  Llama-like SentencePiece-style BPE whose post-processor adds BOS, and a SmolLM2/Qwen2-like
  byte-level BPE that adds nothing), decoding exactly the trained positions gives the assistant
  answers plus their end tokens and nothing else; the image is a single -200, masked, at the start
  of the first human turn; the inference prompt is a prefix of the training ids; truncation never
  drops the image or all targets;
- the masks survive the dataset and collate (padding with the pad id, -100, attention mask, pixel
  stacking);
- hand-written image preprocessing matches transformers' CLIP and SigLIP processors (PIL backends),
  for pad / crop / squash and for L, LA, P, RGBA, CMYK and 16-bit images;
- the shapes data set (offline/shapes.py) is deterministic and its gold answers agree with its
  metadata;
- every kind of bad input fails with an error that names the file and the sample.

Hermetic and CPU-only (tokenizers are trained here on a few sentences). Run from the repo root:
    python -m pytest -q tests/test_data.py
"""

import json
import os
import random
import re
import string

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import data
from offline import shapes, standins
from tinyllava import IGNORE_INDEX, IMAGE_TOKEN_INDEX

CONV = [  # multi-turn, with the tag at the END of the first turn: it must be moved to the start
    {"from": "human", "value": "What color is the circle?\n<image>"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "3"},
]
TEXT_CONV = [  # text-only, with its own system prompt
    {"from": "system", "value": "Answer in one word."},
    {"from": "human", "value": "What is two plus two?"},
    {"from": "gpt", "value": "four"},
]
CAPTION_CONV = [
    {"from": "human", "value": "<image>"},
    {"from": "gpt", "value": "a large red circle at the top left."},
]
CORPUS = (
    [data.VICUNA_SYSTEM, "You are a helpful assistant.", "USER: ASSISTANT: user assistant system"]
    + [t["value"] for t in CONV + TEXT_CONV + CAPTION_CONV] + [string.printable] * 3
)


def build_tokenizer(folder, llama):
    """llama=True: SentencePiece-style (space marker, BOS added by the post-processor, no pad
    token); llama=False: byte-level BPE without BOS, like SmolLM2 / Qwen2."""
    if llama:
        specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = list(set("".join(CORPUS)))
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=alphabet)
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
        config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
                  "unk_token": "<unk>"}
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=alphabet)
        tok.train_from_iterator(CORPUS, trainer)
        config = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"llama": build_tokenizer(root / "llama", llama=True),
            "bytelevel": build_tokenizer(root / "bytelevel", llama=False)}


@pytest.fixture(scope="module", params=["llama", "bytelevel"])
def tok(request, tok_dirs):
    return data.load_tokenizer(tok_dirs[request.param])

# -----------------------------------------------------------------------------
# tokenizer


def test_load_tokenizer_special_ids(tok_dirs, tmp_path):
    llama = data.load_tokenizer(tok_dirs["llama"])
    # BOS found from the post-processor
    assert (llama.bos_id, llama.eos_id) == (1, 2) and llama.add_bos
    assert llama.pad_id == llama.eos_id  # no pad token: padded with EOS
    assert llama.prefix_space and llama.encode("red")[0] != llama.bos_id  # encode never adds BOS
    byte = data.load_tokenizer(tok_dirs["bytelevel"])
    assert byte.bos_id is None and not byte.add_bos and not byte.prefix_space
    assert byte.eos_id == byte.pad_id == byte.token_to_id("<|endoftext|>")
    assert byte.decode(byte.encode("How many shapes?")) == "How many shapes?"
    # add_bos_token in the config wins, and ids can come from config.json
    folder = tmp_path / "t"
    folder.mkdir()
    source = os.path.join(tok_dirs["bytelevel"], "tokenizer.json")
    (folder / "tokenizer.json").write_text(open(source).read())
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    t = data.load_tokenizer(str(folder))
    assert (t.bos_id, t.eos_id, t.pad_id, t.add_bos) == (1, 2, 2, True)

# -----------------------------------------------------------------------------
# templates and masks


def trained_spans(ids, labels):
    """Maximal runs of trained positions, as lists of ids."""
    spans, prev = [], False
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i  # a trained label is the token itself (unshifted)
            if prev:
                spans[-1].append(i)
            else:
                spans.append([i])
        prev = label != IGNORE_INDEX
    return spans


def end_text(tok, template):
    return template.end or tok.decode([tok.eos_id])


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "plain"])
def test_trained_tokens_are_exactly_the_answers(tok, name):
    template = data.get_template(name)
    convs = [CAPTION_CONV] if name == "plain" else [CONV, TEXT_CONV]
    for conv in convs:
        ids, labels = data.tokenize_conversation(conv, tok, name)
        assert len(ids) == len(labels)
        answers = [t["value"] for t in conv if t["from"] == "gpt"]
        spans = trained_spans(ids, labels)
        assert ([tok.decode(s).strip() for s in spans]
                == [a + end_text(tok, template) for a in answers])
        assert (ids[0] == tok.bos_id) == tok.add_bos and ids.count(tok.bos_id) <= 1
        untrained = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX and i >= 0]
        masked = tok.decode(untrained)
        if template.keep_user_text:  # every question is in the prompt, untrained
            questions = [t["value"].replace("<image>", "").strip()
                         for t in conv if t["from"] == "human"]
            assert all(q in masked for q in questions)
        if conv is TEXT_CONV:  # the conversation's own system prompt replaces the template's
            assert "Answer in one word." in masked and (template.system or "@") not in masked
            assert IMAGE_TOKEN_INDEX not in ids


@pytest.mark.parametrize("kind, name", [
    ("llama", "vicuna_v1"), ("bytelevel", "vicuna_v1"), ("bytelevel", "chatml")])
def test_same_tokens_as_the_whole_text(tok_dirs, kind, name):
    """Where a tokenizer would not merge across a turn boundary anyway, tokenizing piece by piece
    gives the very tokens of the whole rendered text: safe masks cost nothing. (Not llama + chatml:
    a SentencePiece tokenizer puts a space marker before every piece, here before each answer.)"""
    tok = data.load_tokenizer(tok_dirs[kind])
    conv = TEXT_CONV + [{"from": "human", "value": "And three plus three?"},
                        {"from": "gpt", "value": "six"}]
    eos = tok.decode([tok.eos_id])
    text = {
        "vicuna_v1": "Answer in one word. USER: What is two plus two? ASSISTANT: four{0}"
                     "USER: And three plus three? ASSISTANT: six{0}",
        "chatml": "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
                  "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
                  "<|im_start|>assistant\nfour<|im_end|>\n"
                  "<|im_start|>user\nAnd three plus three?<|im_end|>\n"
                  "<|im_start|>assistant\nsix<|im_end|>\n",
    }[name].format(eos)
    ids, _ = data.tokenize_conversation(conv, tok, name)
    assert ids == tok.tok.encode(text, add_special_tokens=tok.add_bos).ids


@pytest.mark.parametrize("name, before", [
    ("vicuna_v1", "USER:"), ("chatml", "<|im_start|>user\n"), ("plain", "")])
def test_image_placeholder_is_one_masked_id_at_start_of_first_turn(tok, name, before):
    conv = CAPTION_CONV if name == "plain" else CONV
    ids, labels = data.tokenize_conversation(conv, tok, name)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    pos = ids.index(IMAGE_TOKEN_INDEX)
    assert labels[pos] == IGNORE_INDEX
    # SentencePiece decoding adds spaces around specials
    squash = lambda s: s.replace(" ", "")  # noqa: E731
    assert squash(tok.decode([i for i in ids[:pos] if i != tok.bos_id])).endswith(squash(before))
    if name == "plain":  # the human's text is dropped: image, caption, EOS
        assert pos == int(tok.add_bos) and len(trained_spans(ids, labels)[0]) == len(ids) - pos - 1
    else:
        assert tok.decode(ids[pos + 1:]).lstrip(" ").startswith("\nWhat color is the circle?")


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml", "plain"])
def test_inference_prompt_is_prefix_of_training_ids(tok, name):
    for conv in ([CAPTION_CONV] if name == "plain" else [CONV, TEXT_CONV]):
        ids, labels = data.tokenize_conversation(conv, tok, name)
        for k in range(len(conv)):  # every human turn is a place where generation could start
            if conv[k]["from"] == "human":
                prompt = data.build_prompt(conv[:k + 1], tok, name)
                assert ids[:len(prompt)] == prompt
                assert (labels[len(prompt) - 1] == IGNORE_INDEX
                        and labels[len(prompt)] != IGNORE_INDEX)
    # the prompt ends with the assistant's cue, the answer is what comes next
    prompt = tok.decode(data.build_prompt(CONV[:1], tok, "vicuna_v1"))
    assert prompt.replace(" ", "").endswith("ASSISTANT:")


def test_template_by_object_and_unknown_name(tok):
    by_object = data.tokenize_conversation(CONV, tok, data.TEMPLATES["chatml"])
    assert by_object == data.tokenize_conversation(CONV, tok, "chatml")
    with pytest.raises(ValueError, match="plain, vicuna_v1, chatml"):
        data.get_template("llama3")


def test_conversation_errors(tok):
    with pytest.raises(ValueError, match="alternate"):
        data.tokenize_conversation(CONV[1:], tok, "vicuna_v1")
    with pytest.raises(ValueError, match="end with a gpt"):
        data.tokenize_conversation(CONV[:3], tok, "vicuna_v1")
    second_image = {"from": "human", "value": "<image>"}
    with pytest.raises(ValueError, match="at most one"):
        data.tokenize_conversation([CONV[0], CONV[1], second_image, CONV[3]], tok, "chatml")


def test_truncation(tok):
    ids, labels = data.tokenize_conversation(CONV, tok, "vicuna_v1")
    first_trained = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    cut_ids, cut_labels = data.tokenize_conversation(CONV, tok, "vicuna_v1",
                                                     max_len=first_trained + 2)
    assert cut_ids == ids[:first_trained + 2] and cut_labels == labels[:first_trained + 2]
    assert sum(label != IGNORE_INDEX for label in cut_labels) == 2
    with pytest.raises(data.TooLong, match="no trained token"):
        data.tokenize_conversation(CONV, tok, "vicuna_v1", max_len=first_trained)
    with pytest.raises(data.TooLong, match="image placeholder"):
        data.tokenize_conversation(CONV, tok, "vicuna_v1", max_len=ids.index(IMAGE_TOKEN_INDEX))
    assert data.tokenize_conversation(CONV, tok, "vicuna_v1", max_len=len(ids)) == (ids, labels)

# -----------------------------------------------------------------------------
# images


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def expand2square(image, background):
    # LLaVA-1.5's, verbatim in spirit: the reference for mode "pad"
    w, h = image.size
    if w == h:
        return image
    result = Image.new(image.mode, (max(w, h),) * 2, background)
    result.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return result


def mode_variants(rgb):
    rgba = rgb.convert("RGBA")
    alpha = np.tile(np.arange(rgb.width, dtype=np.uint8) * 4, (rgb.height, 1))  # a left-right ramp
    rgba.putalpha(Image.fromarray(alpha))
    p = rgb.convert("P")
    p.info["transparency"] = 0
    return {"RGB": rgb, "L": rgb.convert("L"), "LA": rgba.convert("LA"), "P": rgb.convert("P"),
            "P+t": p, "RGBA": rgba, "CMYK": rgb.convert("CMYK")}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocess_matches_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    if kind == "clip":
        cfg = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 48},
               "crop_size": {"height": 48, "width": 48}, "do_center_crop": True,
               "image_mean": list(data.CLIP_MEAN), "image_std": list(data.CLIP_STD), "resample": 3}
        ref = transformers.CLIPImageProcessorPil
    else:
        cfg = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 40, "width": 40},
               "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3}
        ref = transformers.SiglipImageProcessorPil
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours, ref = data.load_image_processor_config(str(tmp_path)), ref.from_pretrained(str(tmp_path))
    assert ours.mode == ("crop" if kind == "clip" else "squash")
    worst = 0.0
    for w, h in [(70, 50), (50, 71), (64, 64), (300, 97)]:
        for mode, image in mode_variants(random_image(w, h, seed=w)).items():
            expected = ref(image, return_tensors="pt")["pixel_values"][0]
            got = data.preprocess_image(image, ours.size, ours.mean, ours.std, mode=ours.mode)
            assert (got.shape == expected.shape == (3, ours.size, ours.size)
                    and got.dtype == torch.float32)
            worst = max(worst, (got - expected).abs().max().item())
            # "pad" is expand2square with the mean colour, then the encoder's own processor
            square = expand2square(data.to_rgb(image), tuple(int(x * 255) for x in ours.mean))
            expected = ref(square, return_tensors="pt")["pixel_values"][0]
            got = data.preprocess_image(image, ours.size, ours.mean, ours.std, mode="pad")
            worst = max(worst, (got - expected).abs().max().item())
    print(f"max abs diff vs transformers {kind}: {worst:.2e}")
    assert worst < 1e-2


def test_16bit_and_config_defaults(tmp_path):
    gray8 = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint16)
    gray16 = Image.fromarray(gray8 * 257)  # 16-bit: full range 0..65535
    assert gray16.mode.startswith("I")
    a = data.preprocess_image(gray16, 16, data.CLIP_MEAN, data.CLIP_STD, mode="squash")
    gray8_image = Image.fromarray(gray8.astype(np.uint8))
    b = data.preprocess_image(gray8_image, 16, data.CLIP_MEAN, data.CLIP_STD, mode="squash")
    assert torch.equal(a, b)  # scaled to 8 bits, not clipped at 255
    assert data.to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    # padding is the mean colour, so it normalises to ~0
    red = Image.new("RGB", (40, 10), (255, 0, 0))
    x = data.preprocess_image(red, 20, data.CLIP_MEAN, data.CLIP_STD, mode="pad")
    assert x[:, 0, 10].abs().max() < 0.02 and x[0, 10, 10] > 1.5
    with pytest.raises(ValueError, match="pad"):
        data.preprocess_image(Image.new("RGB", (4, 4)), 4, data.CLIP_MEAN, data.CLIP_STD,
                              mode="stretch")
    c = data.load_image_processor_config(str(tmp_path))  # nothing there: CLIP defaults
    assert (c.size, c.mean, c.mode) == (224, data.CLIP_MEAN, "crop")
    siglip = {"vision_config": {"model_type": "siglip_vision_model", "image_size": 384}}
    (tmp_path / "config.json").write_text(json.dumps(siglip))
    c = data.load_image_processor_config(str(tmp_path))
    assert (c.size, c.mean, c.std, c.mode) == (384, data.SIGLIP_MEAN, data.SIGLIP_STD, "squash")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 336, "crop_size": 336}))
    assert data.load_image_processor_config(str(tmp_path)).size == 336

# -----------------------------------------------------------------------------
# datasets, collate, batching


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return str(path)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    random_image(40, 30).save(tmp_path / "img" / "a.png")
    random_image(30, 40, seed=1).convert("L").save(tmp_path / "img" / "b.png")
    samples = [{"id": "s0", "image": "img/a.png", "conversations": CONV},
               {"id": "s1", "conversations": TEXT_CONV},
               {"id": "s2", "image": str(tmp_path / "img" / "b.png"),  # absolute path, and no tag
                "conversations": [{"from": "human", "value": "Describe it."}, CAPTION_CONV[1]]},
               {"id": "s3", "conversations": TEXT_CONV[1:]}]
    write_json(tmp_path / "train.json", samples)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
    return tmp_path


@pytest.mark.parametrize("ext", ["json", "jsonl"])
def test_dataset_to_batch_keeps_masks(folder, tok, ext):
    image_cfg = data.ImageConfig(16, data.CLIP_MEAN, data.CLIP_STD)
    ds = data.ConversationDataset(str(folder / f"train.{ext}"), tok, "vicuna_v1", image_cfg)
    assert len(ds) == 4 and ds.has_image == [True, False, True, False]
    item = ds[2]
    assert item["pixel_values"].shape == (3, 16, 16) and item["input_ids"].dtype == torch.long
    # the untagged image got its placeholder
    assert item["input_ids"].tolist().count(IMAGE_TOKEN_INDEX) == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=4,
                                         collate_fn=lambda b: data.collate(b, tok.pad_id))
    batch = next(iter(loader))
    lengths = [len(ds[i]["input_ids"]) for i in range(4)]
    T = max(lengths)
    assert (batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
            == (4, T))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["pixel_values"][1], ds[2]["pixel_values"])  # stacked in batch order
    assert (batch["has_image"].tolist() == [True, False, True, False]
            and batch["ids"] == ["s0", "s1", "s2", "s3"])
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert ((batch["input_ids"][i, n:] == tok.pad_id).all()
                and (batch["labels"][i, n:] == IGNORE_INDEX).all())
        ids, labels = batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()
        answers = [t["value"] for t in ds_conv(folder, i) if t["from"] == "gpt"]
        assert ([tok.decode(s).strip() for s in trained_spans(ids, labels)]
                == [a + tok.decode([tok.eos_id]) for a in answers])
    text_only = data.collate([ds[1], ds[3]], tok.pad_id)
    assert text_only["pixel_values"] is None


def ds_conv(folder, i):
    return json.loads((folder / "train.json").read_text())[i]["conversations"]


@pytest.mark.parametrize("template", list(data.TEMPLATES))
def test_dataset_tokens_equal_tokenize_conversation(folder, tok, template, monkeypatch):
    """The data set tokenizes the pieces of many samples in one call (here in chunks of 3 samples, so a
    chunk boundary falls inside the file) and keeps them in one array: each sample's ids and labels
    equal tokenize_conversation's for that sample alone."""
    monkeypatch.setattr(data.ConversationDataset, "CHUNK", 3)
    ds = data.ConversationDataset(str(folder / "train.json"), tok, template)
    samples = data.load_samples(str(folder / "train.json"))
    assert len(ds) == len(samples) == 4
    for i, s in enumerate(samples):
        convs = data.with_image_tag(s["conversations"]) if "image" in s else s["conversations"]
        assert ds.tokens_of(i) == data.tokenize_conversation(convs, tok, template)


def test_tokenized_data_set_is_cached_for_the_next_run(folder, tok, tmp_path, monkeypatch, capsys):
    """A second data set over the same file, tokenizer, template and max_len loads the first one's
    arrays instead of tokenizing (the same samples, ids, labels, images); another max_len does not."""
    cache, file = tmp_path / "cache", str(folder / "train.json")
    first = data.ConversationDataset(file, tok, "vicuna_v1", cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 1

    def no_tokenizing(*args):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data.ConversationDataset, "_tokenize", no_tokenizing)
    again = data.ConversationDataset(file, tok, "vicuna_v1", cache_dir=str(cache))
    assert "tokenized before" in capsys.readouterr().out
    assert [again.ids.tolist(), again.images.tolist(), again.skipped] == \
        [first.ids.tolist(), first.images.tolist(), first.skipped]
    assert [again.tokens_of(i) for i in range(len(again))] == [first.tokens_of(i) for i in range(len(first))]
    assert again.images[0] and not again.images[1]  # "no image" survives the cache
    assert torch.equal(again[0]["pixel_values"], first[0]["pixel_values"])
    with pytest.raises(AssertionError, match="tokenized again"):
        data.ConversationDataset(file, tok, "vicuna_v1", max_len=500, cache_dir=str(cache))


def test_cached_data_set_still_finds_its_images(folder, tok, tmp_path):
    """An image deleted after the data set was tokenized fails when the cache is loaded, naming the
    sample and the file, not steps later in a loader worker."""
    cache, file = tmp_path / "cache", str(folder / "train.json")
    first = data.ConversationDataset(file, tok, "vicuna_v1", cache_dir=str(cache))
    sample_id, image = first.ids[0].decode(), first.images[0].decode()
    os.remove(image)
    message = f"train.json: sample {sample_id}: image not found: .*{os.path.basename(image)}"
    with pytest.raises(data.DataError, match=message):
        data.ConversationDataset(file, tok, "vicuna_v1", cache_dir=str(cache))


def test_truncation_skips_are_counted(folder, tok, capsys):
    ids, labels = data.tokenize_conversation(TEXT_CONV[1:], tok, "vicuna_v1")
    # s3 loses every target
    max_len = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    ds = data.ConversationDataset(str(folder / "train.json"), tok, "vicuna_v1", max_len=max_len)
    assert "s3" in ds.skipped and len(ds) + len(ds.skipped) == 4
    samples = [ds.tokens_of(i) for i in range(len(ds))]
    assert all(len(ids) <= max_len for ids, _ in samples)
    assert all(any(label != IGNORE_INDEX for label in labels) for _, labels in samples)
    assert f"skipped {len(ds.skipped)} of 4" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# viewer


def test_viewer(folder, tok_dirs, capsys):
    tok = data.load_tokenizer(tok_dirs["bytelevel"])
    ids, labels = data.tokenize_conversation(CONV, tok, "vicuna_v1")
    text = data.render_mask(ids, labels, tok)
    assert "[ The circle is red.<|endoftext|>]" in text and "[ 3<|endoftext|>]" in text
    assert "USER: <image>\nWhat color is the circle? ASSISTANT:[" in text
    trained = sum(label != IGNORE_INDEX for label in labels)
    assert text.endswith(f"({len(ids)} tokens: {trained} trained, {len(ids) - trained} masked)")
    assert ("\033[" not in text
            and "\033[1;32m The circle" in data.render_mask(ids, labels, tok, color=True))
    data.main(["show", str(folder / "train.json"), "--tokenizer", tok_dirs["bytelevel"],
               "--template", "chatml", "-n", "2"])
    out = capsys.readouterr().out
    assert "\033[" not in out  # piped, so brackets
    assert "── sample s0" in out and "── sample s1" in out and "s2" not in out
    assert "[The circle is red.<|im_end|>]" in out and "[four<|im_end|>]" in out

# -----------------------------------------------------------------------------
# bad input: each error names the file and the sample


def test_bad_inputs(tmp_path, tok):
    random_image(8, 8).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = {"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Hello."}
    cases = {
        "nojson.json": ('[{"id": "x1", "conversations": []},\n {"id": oops}]', "line 2"),
        "nojsonl.jsonl": ('{"id": "x1", "conversations": []}\n{"id": "x2", \n', "line 2"),
        "noconv.json": ([{"id": "x3", "image": "ok.png", "messages": list(good)}], "x3"),
        "gptfirst.json": ([{"id": "x4", "conversations": list(good[::-1])}], "x4"),
        "twohumans.json": ([{"id": "x5", "image": "ok.png",
                             "conversations": [good[0], good[0], good[1]]}], "x5"),
        "missing.json": ([{"id": "x6", "image": "nope.png", "conversations": list(good)}], "x6"),
        "twotags.json": ([{"id": "x7", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image> <image>"}, good[1]]}], "x7"),
        "noimage.json": ([{"id": "x8", "conversations": list(good)}], "x8"),
    }
    for name, (content, where) in cases.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(data.DataError) as e:
            data.ConversationDataset(str(tmp_path / name), tok, "vicuna_v1")
        assert name in str(e.value) and where in str(e.value), str(e.value)
    # an unreadable image is found when it is loaded
    ds = data.ConversationDataset(write_json(tmp_path / "broken.json", [
        {"id": "x9", "image": "broken.png", "conversations": list(good)}]), tok, "vicuna_v1")
    with pytest.raises(data.DataError,
                       match=r"broken\.json: sample x9: cannot read image .*broken\.png"):
        ds[0]
    with pytest.raises(ValueError, match="unknown template 'vicuna'; "
                                         "known templates: plain, vicuna_v1, chatml"):
        data.ConversationDataset(str(tmp_path / "broken.json"), tok, "vicuna")



def test_check_names_every_bad_sample(tmp_path, tok_dirs, capsys):
    """`data.py check` finds every sample that the data set or training would reject, in one pass over
    worker processes, names each by file and id, counts them, and fails; the good ones pass."""
    random_image(8, 8).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Hello."}]
    long_question = [{"from": "human", "value": "word " * 50}, {"from": "gpt", "value": "Hello."}]
    samples = [
        {"id": "ok1", "image": "ok.png", "conversations": good},
        {"id": "b1", "image": "ok.png", "messages": good},  # no conversations
        {"id": "b2", "image": "ok.png", "conversations": good[::-1]},  # gpt first
        {"id": "b3", "image": "nope.png", "conversations": good},
        {"id": "b4", "image": "broken.png", "conversations": good},
        {"id": "b5", "conversations": good},  # a tag but no image
        {"id": "b6", "conversations": long_question},  # max_len leaves no trained token
        {"id": "ok2", "conversations": [{"from": "human", "value": "Hi?"}, good[1]]},
    ]
    file = write_json(tmp_path / "mixed.json", samples)
    tok = data.load_tokenizer(tok_dirs["bytelevel"])
    # a max_len that the good samples fit in, and that leaves b6 nothing to train
    max_len = len(data.tokenize_conversation(good, tok, "vicuna_v1")[0])
    assert len(data.build_prompt(long_question[:1], tok, "vicuna_v1")) > max_len
    args = ["check", file, "--tokenizer", tok_dirs["bytelevel"], "--template", "vicuna_v1",
            "--max-len", str(max_len), "--workers", "2"]
    with pytest.raises(data.DataError, match="6 bad sample"):
        data.main(args)
    out = capsys.readouterr().out
    for sid, problem in [("b1", "needs 'conversations'"), ("b2", "roles must alternate"),
                         ("b3", "image not found"), ("b4", "cannot read image"), ("b5", "1 <image> tag(s)"),
                         ("b6", f"max_len={max_len} leaves no trained token")]:
        assert f"mixed.json: sample {sid}: {problem}" in out, out
    assert "sample ok" not in out and "2 of 8 samples are good" in out
    write_json(tmp_path / "good.json", [samples[0], samples[-1]])
    data.main(["check", str(tmp_path / "good.json"), "--tokenizer", tok_dirs["bytelevel"],
               "--template", "vicuna_v1", "--workers", "1"])
    assert "2 of 2 samples are good" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# synthetic shapes


def gold(question, objects):
    """Answer a test question from the metadata alone, independently of shapes.ask."""
    have = lambda **kw: [o for o in objects if all(o[k] == v for k, v in kw.items())]  # noqa: E731
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        [o] = have(shape=m[1])
        return o["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        [o] = have(color=m[1])
        return o["shape"]
    if m := re.fullmatch(r"Is the (\w+) (\w+) small or large\?", question):
        [o] = have(color=m[1], shape=m[2])
        return o["size"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        [o] = have(color=m[1], shape=m[2])
        return shapes.CELLS[o["cell"]]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(len(have(color=m[1])))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(len(have(shape=m[1])) if m[1] != "shape" else len(objects))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if have(color=m[1], shape=m[2]) else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_make_shapes(tmp_path, tok):
    counts = shapes.make_shapes(str(tmp_path / "a"), n_images=90, seed=3)
    shapes.main([str(tmp_path / "b"), "--n-images", "90", "--seed", "3"])
    names = ["captions.json", "instruct.json", "test.json", "meta.json", "val.json", "test_chat.json",
             "val_chat.json"]
    files = names + ["images/" + f for f in sorted(os.listdir(tmp_path / "a" / "images"))]
    assert (len(files) == 7 + 90 + 9  # 9 validation images, as many as test images
            and sorted(os.listdir(tmp_path / "a")) == sorted(names + ["images"]))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    shapes.make_shapes(str(tmp_path / "c"), n_images=90, seed=4)
    assert ((tmp_path / "a" / "meta.json").read_bytes()
            != (tmp_path / "c" / "meta.json").read_bytes())

    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    objects = {m["image"]: m["objects"] for m in meta["images"]}
    test_images = {m["image"] for m in meta["images"] if m["split"] == "test"}
    assert len(test_images) == counts["test"] == 9 and meta["cells"] == list(shapes.CELLS)
    for m in meta["images"]:
        assert (1 <= len(m["objects"]) <= 3
                and len({o["cell"] for o in m["objects"]}) == len(m["objects"]))
        with Image.open(tmp_path / "a" / m["image"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    test = json.loads((tmp_path / "a" / "test.json").read_text())
    for s in test:
        q, a = s["conversations"][0]["value"], s["conversations"][1]["value"]
        assert s["image"] in test_images and s["type"] in shapes.QUESTION_KINDS
        assert gold(q.removeprefix("<image>\n"), objects[s["image"]]) == a
    for name in ("captions", "instruct"):
        samples = json.loads((tmp_path / "a" / f"{name}.json").read_text())
        assert not test_images & {s.get("image") for s in samples}
        for s in samples:
            if name == "captions":
                for o in objects[s["image"]]:
                    assert (f"{o['size']} {o['color']} {o['shape']} at the "
                            f"{shapes.CELLS[o['cell']]}" in s["conversations"][1]["value"])
            elif "image" in s:
                for q, a in zip(s["conversations"][::2], s["conversations"][1::2]):
                    question = q["value"].removeprefix("<image>\n")
                    if question != "Describe the image.":
                        assert gold(question, objects[s["image"]]) == a["value"]
    instruct = json.loads((tmp_path / "a" / "instruct.json").read_text())
    kinds = [s["id"].split("-")[0] for s in instruct]
    assert kinds.count("text") == kinds.count("instruct") // 9
    assert {k for s, k in zip(instruct, kinds) if "image" not in s} == {"text"}
    # the focused conversations: one "where" per confusable object, then a description; a description
    # alone of every training image with more than one object
    train = {m["image"]: m["objects"] for m in meta["images"] if m["split"] == "train"}
    lookups = {s["image"]: s["conversations"] for s in instruct if s["id"].startswith("lookup-")}
    assert lookups and set(lookups) == {i for i, o in train.items() if shapes.confusable(o)}
    for image, turns in lookups.items():
        asked = {q["value"].removeprefix("<image>\n") for q in turns[:-2:2]}
        assert asked == {f"Where is the {o['color']} {o['shape']}?"
                         for o in shapes.confusable(train[image])}
        assert [t["value"] for t in turns[-2:]] == ["Describe the image.", shapes.caption(train[image])]
    described = [s["image"] for s in instruct if s["id"].startswith("describe-")]
    assert sorted(described) == sorted(i for i, o in train.items() if len(o) > 1)
    for name in ("captions", "instruct", "test"):  # every file passes the dataset's checks
        ds = data.ConversationDataset(str(tmp_path / "a" / f"{name}.json"), tok,
                                      "plain" if name == "captions" else "vicuna_v1",
                                      data.ImageConfig(32, data.CLIP_MEAN, data.CLIP_STD))
        assert ds[0]["input_ids"].numel() > 0
    # the validation split: new images, one question each, the gold answer right
    val = json.loads((tmp_path / "a" / "val.json").read_text())
    val_images = {m["image"] for m in meta["images"] if m["split"] == "val"}
    assert len(val) == counts["val"] == 9 and {s["image"] for s in val} == val_images
    assert not val_images & (test_images | {s.get("image") for s in instruct})
    for s in val:
        assert gold(s["conversations"][0]["value"].removeprefix("<image>\n"), objects[s["image"]]) == \
            s["conversations"][1]["value"]
    # the held-out conversations: one per test (validation) image, a caption then typed questions,
    # all answers right
    for name, questions in (("test_chat", test), ("val_chat", val)):
        chats = json.loads((tmp_path / "a" / f"{name}.json").read_text())
        assert [s["image"] for s in chats] == [s["image"] for s in questions]
        for s in chats:
            turns = s["conversations"]
            assert len(s["types"]) == len(turns) // 2 >= 3 and s["types"][0] == "describe"
            assert turns[1]["value"] == shapes.caption(objects[s["image"]])
            for q, a in zip(turns[2::2], turns[3::2]):
                assert gold(q["value"], objects[s["image"]]) == a["value"]
            assert len({q["value"] for q in turns[::2]}) == len(turns) // 2  # no question asked twice
    for name in ("val", "test_chat", "val_chat"):
        ds = data.ConversationDataset(str(tmp_path / "a" / f"{name}.json"), tok, "chatml")
        assert ds[0]["input_ids"].numel() > 0
    test_texts = set(standins.iter_texts(str(tmp_path / "a" / "test.json")))
    instruct_texts = set(standins.iter_texts(str(tmp_path / "a" / "instruct.json")))
    assert "How many shapes are there?" in test_texts | instruct_texts


def test_confusable_objects_need_colour_and_shape():
    red_circle, red_square, blue_circle, green_triangle = (
        dict(color=c, shape=s) for c, s in (("red", "circle"), ("red", "square"), ("blue", "circle"),
                                            ("green", "triangle")))
    assert shapes.confusable([red_circle, red_square, green_triangle]) == [red_circle, red_square]
    assert shapes.confusable([red_circle, blue_circle, red_square]) == [red_circle, blue_circle, red_square]
    assert shapes.confusable([red_circle, green_triangle]) == []
    # two red circles: no question names one of them
    assert shapes.confusable([red_circle, dict(red_circle), red_square]) == [red_square]


def test_hard_questions_ask_about_near_misses():
    """hard=True (the stand-in LLM's pretraining) asks "is there" about absent objects that share a
    colour or a shape with one that is there; the answers stay correct. Without it, some ask about
    neither."""
    for hard in (True, False):
        rng, near, noes = random.Random(0), 0, 0
        for _ in range(300):
            objects = shapes.random_objects(rng)
            for q, a in shapes.random_questions(objects, rng, n_turns=6, hard=hard):
                assert q == "Describe the image." or gold(q, objects) == a
                if a == "no" and (m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q)):
                    noes += 1
                    near += any(o["color"] == m[1] or o["shape"] == m[2] for o in objects)
        assert noes > 50 and (near == noes) == hard


def test_distinct_questions_are_never_repeated_in_a_conversation():
    def repeats(distinct):
        rng = random.Random(0)
        n = 0
        for _ in range(300):
            objects = shapes.random_objects(rng)
            qas = shapes.random_questions(objects, rng, n_turns=6, hard=True, distinct=distinct)
            questions = [q for q, _ in qas]
            assert len(questions) == 6
            n += len(questions) - len(set(questions))
        return n

    assert repeats(distinct=False) > 100 and repeats(distinct=True) == 0


def test_describe_sets_how_often_a_conversation_opens_with_a_caption():
    rng = random.Random(0)
    for describe, lo, hi in ((0.0, 0, 0), (0.1, 10, 40), (1.0, 200, 200)):
        opens = sum(shapes.random_questions(shapes.random_objects(rng), rng, n_turns=3,
                                            describe=describe)[0][0] == "Describe the image."
                    for _ in range(200))
        assert lo <= opens <= hi, (describe, opens)
