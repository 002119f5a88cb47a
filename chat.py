"""
Talk to a trained tinyllava, or score it: the layer above the model (tinyllava.py) and data.py.

    python chat.py chat --model runs/sft --image data/shapes/images/03600.png [--prompt TEXT]
    python chat.py eval --model runs/sft --data data/shapes/test.json [--out answers.jsonl]

--model is stage 2's checkpoint (runs/sft) or stage 1's output (runs/pt: the captioner it made).

The prompt is built by data.py's template code, the very code that built the training data, and the
image is prepared with the settings the model was trained with (its config.json's `tinyllava_chat`).
"""

import argparse
import json
import os

import tokenizers
import torch
from safetensors.torch import load_file

import data
from tinyllava import InputError, TinyLlava, command_line, load_weights, read_config, write_json

PROJECTOR_FILE = "projector.safetensors"  # stage 1's result, beside a config.json naming its parts


def load_stage1(path, device=None):
    """A TinyLlava rebuilt from stage 1's output (train_pt.py): the vision tower and LLM it names,
    the trained projector (loaded strictly: every projector weight must be in the file)."""
    d = read_config(path)
    sources = d.get("tinyllava_sources") or {}
    if not {"vision", "llm"} <= sources.keys():
        raise InputError(f"{path}/config.json does not name the vision and LLM checkpoints "
                         "(tinyllava_sources): is it train_pt.py's output?")
    model = TinyLlava.from_parts(sources["vision"], sources["llm"], d["projector_type"],
                                 device=device)
    tensors = load_file(os.path.join(path, PROJECTOR_FILE), device=str(device or "cpu"))
    load_weights(model.multi_modal_projector, tensors, path,
                 key_map=lambda k: k.removeprefix("multi_modal_projector."), device=device)
    model.chat = dict(d.get("tinyllava_chat") or {})
    return model


# transformers' chat template for chatml, written as data.py's chatml template writes a conversation
# (its default system prompt, the image tag before the text of its turn), so that the processor's
# prompt tokenizes to the ids tinyllava's prompt has, each image tag expanded to the image's tokens
CHATML_JINJA = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n" + data.TEMPLATES["chatml"].system
    + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] if c['type'] == 'image' %}" + data.IMAGE_TAG + "\n{% endfor %}"
    "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_checkpoint(model, path):
    """Stage 2's result: model.save_pretrained, plus what transformers needs to *run* it, not only load
    it: an image token in the tokenizer (added where it has none) whose id the config names, and the
    processor's files: preprocessor_config.json (LlavaImageProcessor, padding as LLaVA-1.5 does),
    processor_config.json (how many tokens an image becomes) and, for chatml, the chat template."""
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model.source_dir, "tokenizer.json"))
    if tokenizer.token_to_id(data.IMAGE_TAG) is None:
        tokenizer.add_special_tokens([tokenizers.AddedToken(data.IMAGE_TAG, special=True, normalized=False)])
    model.save_pretrained(path, image_token_id=tokenizer.token_to_id(data.IMAGE_TAG))
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    settings = data.ChatConfig.from_dict(model.chat)
    image, vision = settings.image, model.vision_tower.config
    write_json(os.path.join(path, "preprocessor_config.json"), {
        "image_processor_type": "LlavaImageProcessor", "do_pad": image.mode == "pad",
        "do_resize": True, "resample": 3,  # squash: straight to size x size; else the shortest edge
        "size": {"height": image.size, "width": image.size} if image.mode == "squash"
        else {"shortest_edge": image.size},
        "do_center_crop": image.mode != "squash", "crop_size": {"height": image.size, "width": image.size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(image.mean), "image_std": list(image.std), "do_convert_rgb": True})
    write_json(os.path.join(path, "processor_config.json"), {
        "processor_class": "LlavaProcessor", "image_token": data.IMAGE_TAG, "patch_size": vision.patch_size,
        "vision_feature_select_strategy": "default" if vision.select_feature == "patch" else "full",
        "num_additional_image_tokens": int(vision.has_cls)})
    if settings.template == "chatml":
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(CHATML_JINJA)


def load_for_inference(path, device=None, template=None):
    """(model, tokenizer, data.ChatConfig) from a checkpoint written by train_sft.py, or from stage
    1's output (its projector with the parts it names). Another LLaVA checkpoint works given a
    template; its images follow its preprocessor_config.json, padded."""
    if os.path.exists(os.path.join(path, PROJECTOR_FILE)):
        model = load_stage1(path, device).eval()
    else:
        model = TinyLlava.from_pretrained(path, device=device).eval()
    tokenizer = data.load_tokenizer(model.source_dir)
    settings = dict(model.chat)
    settings["template"] = template or settings.get("template")
    if settings["template"] is None:
        raise InputError(f"{path}/config.json names no conversation template (tinyllava_chat): "
                         "pass --template")
    data.get_template(settings["template"])  # an unknown name fails here, naming it
    if "image" not in settings:
        c = data.load_image_processor_config(path)
        settings["image"] = dict(size=c.size, mean=c.mean, std=c.std, mode="pad")
    return model, tokenizer, data.ChatConfig.from_dict(settings)


def stop_ids(model, tokenizer, template):
    """Token ids that end an answer: the template's end token and the LLM's own end tokens."""
    template = data.get_template(template)
    eos = model.language_model.config.eos_token_id
    ids = {tokenizer.eos_id if template.end is None else tokenizer.token_to_id(template.end)}
    ids |= set([eos] if isinstance(eos, int) else eos or [])
    return sorted(i for i in ids if i is not None)


def answer_batch(model, tokenizer, prompts, pixel_values, stop, max_new_tokens=32):
    """Greedy answers (strings) to a batch of prompts (lists of ids, -200 where the image goes);
    pixel_values (n_img, 3, H, W) for the prompts that have an image, in order, or None.

    The prompts are LEFT-padded: each generated token is appended in one column for the whole
    batch, so every prompt must end in that column (training pads on the right: nothing follows)."""
    device = model.language_model.lm_head.weight.device
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), 0, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = torch.tensor(p), 1
    pixel_values = None if pixel_values is None else pixel_values.to(device)
    out = model.generate(ids.to(device), pixel_values, mask.to(device),
                         max_new_tokens=max_new_tokens, eos_token_id=stop)
    answers = []
    for row in out.tolist():
        end = next((k for k, t in enumerate(row) if t in stop), len(row))  # the first end token
        row = row[:end]
        answers.append(tokenizer.decode(row).strip())
    return answers


def normalize(text):
    """Exact match ignores case, punctuation and spacing: 'Red.' == 'red'."""
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def evaluate(model_dir, data_file, image_folder=None, batch_size=64, out=None, device=None,
             template=None, max_new_tokens=32):
    """Answer every reference turn of every sample by greedy generation (see evaluate_model); print
    exact-match accuracy, overall, per "type" and per turn; write the answers as JSONL (default: into
    model_dir). Returns the accuracies."""
    model, tokenizer, settings = load_for_inference(model_dir, device, template)
    out = out or os.path.join(model_dir, "answers.jsonl")
    return evaluate_model(model, tokenizer, settings, data_file, out=out, image_folder=image_folder,
                          batch_size=batch_size, max_new_tokens=max_new_tokens)


def evaluate_model(model, tokenizer, settings, data_file, out, image_folder=None, batch_size=64,
                   max_new_tokens=32):
    """evaluate() for a model already in memory, talked to as data.ChatConfig `settings` says.

    Each gpt turn of a sample is a reference. The model answers the first human turn, then the second
    after its *own* first answer (not the reference), and so on, as in a chat: a wrong description
    stays in the context of the questions that follow it. A turn's type is the sample's "types"[k],
    or its "type" for a one-question sample."""
    stop = stop_ids(model, tokenizer, settings.template)
    folder = image_folder or os.path.dirname(os.path.abspath(data_file))
    samples = data.load_samples(data_file)
    if not samples:
        raise data.DataError(f"{data_file}: no samples to evaluate")
    turns = [reference_turns(s, data_file) for s in samples]  # [(system turns, [(question, answer)])]
    predictions = [[] for _ in samples]
    for k in range(max(len(qas) for _, qas in turns)):  # round k: every sample's k-th question
        todo = [i for i, (_, qas) in enumerate(turns) if len(qas) > k]
        for j in range(0, len(todo), batch_size):
            prompts, pixels = [], []
            for i in todo[j : j + batch_size]:
                system, qas = turns[i]
                history = [t for (q, _), a in zip(qas, predictions[i])
                           for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
                convs = system + history + [{"from": "human", "value": qas[k][0]}]
                prompt, pixel_values = question(samples[i], convs, data_file, folder,
                                                tokenizer=tokenizer, settings=settings)
                prompts.append(prompt)
                pixels += [] if pixel_values is None else [pixel_values]
            pixels = torch.stack(pixels) if pixels else None
            answers = answer_batch(model, tokenizer, prompts, pixels, stop=stop,
                                   max_new_tokens=max_new_tokens)
            for i, a in zip(todo[j : j + batch_size], answers):
                predictions[i].append(a)
    rows = []
    for s, (_, qas), preds in zip(samples, turns, predictions):
        types = s.get("types") or [s.get("type")] * len(qas)
        for k, ((q, ref), a) in enumerate(zip(qas, preds)):
            rows.append(dict(id=s["id"], turn=k + 1, type=types[k], question=q, answer=ref,
                             prediction=a, correct=normalize(a) == normalize(ref)))
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    groups = {"all": rows}
    for t in sorted({r["type"] for r in rows if r["type"] is not None}):
        groups[t] = [r for r in rows if r["type"] == t]
    if any(r["turn"] > 1 for r in rows):
        for k in sorted({r["turn"] for r in rows}):
            groups[f"turn {k}"] = [r for r in rows if r["turn"] == k]
    print(f"exact match on {len(rows)} answers of {data_file}:")
    accuracy = {}
    for name, group in groups.items():
        right = sum(r["correct"] for r in group)
        accuracy[name] = right / max(1, len(group))
        print(f"  {name:<10} {accuracy[name]:7.1%}  ({right}/{len(group)})")
    print(f"answers written to {out}")
    return accuracy


def reference_turns(sample, data_file):
    """(leading system turns, [(question, reference answer)]) of an eval sample; each human turn must
    be followed by its reference, from gpt. Checked here, before anything is generated."""
    where = f"{data_file}: sample {sample['id']}"
    if problem := data.tag_problem(sample):
        raise data.DataError(f"{where}: {problem}")
    convs = sample["conversations"]
    system = [t for t in convs[:1] if t["from"] == "system"]
    rest = convs[len(system):]
    roles = [t["from"] for t in rest]
    if not rest or roles != ["human", "gpt"] * (len(rest) // 2):
        raise data.DataError(f"{where}: the turns must alternate human, gpt, and end with the reference "
                             f"answer (from gpt); got {roles}")
    if "types" in sample and len(sample["types"]) != len(rest) // 2:
        raise data.DataError(f"{where}: {len(sample['types'])} types for {len(rest) // 2} questions")
    qas = [(q["value"], a["value"]) for q, a in zip(rest[::2], rest[1::2])]
    if any(data.IMAGE_TAG in t for t in [a for _, a in qas] + [q for q, _ in qas[1:]]):
        raise data.DataError(f"{where}: the {data.IMAGE_TAG} tag may only be in the first question")
    return system, qas


def question(sample, convs, data_file, folder, tokenizer, settings):
    """(prompt ids, pixels (3, H, W) or None) of the turns `convs` of an eval sample, ready to answer."""
    where = f"{data_file}: sample {sample['id']}"
    pixel_values = None
    if "image" in sample:
        convs = data.with_image_tag(convs)
        pixel_values = data.load_image(os.path.join(folder, sample["image"]), settings.image, where=where)
    try:
        return data.build_prompt(convs, tokenizer, settings.template), pixel_values
    except ValueError as e:
        raise data.DataError(f"{where}: {e}") from None


def chat(model_dir, image_file=None, prompt=None, device=None, template=None, max_new_tokens=256,
         temperature=0.0):
    """A multi-turn chat in the terminal (one turn with `prompt`), answers streamed as they come."""
    model, tokenizer, settings = load_for_inference(model_dir, device, template)
    stop = stop_ids(model, tokenizer, settings.template)
    device = model.language_model.lm_head.weight.device
    pixel_values = None
    if image_file is not None:
        pixel_values = data.load_image(image_file, settings.image)[None].to(device)
    conversation = []
    if prompt is None:
        print("(an empty line or Ctrl-D ends the chat)")
    while True:
        try:
            text = prompt if prompt is not None else input("user> ")
        except EOFError:
            text = ""
        if not text.strip():
            return conversation
        if not conversation and pixel_values is not None:
            text = data.image_first(text)
        conversation.append({"from": "human", "value": text})
        prompt_ids = data.build_prompt(conversation, tokenizer, settings.template)
        ids = torch.tensor([prompt_ids], device=device)
        print("assistant> ", end="", flush=True)
        tokens, shown = [], ""
        for t in model.stream(ids, pixel_values, max_new_tokens=max_new_tokens,
                              temperature=temperature, eos_token_id=stop):
            if t.item() in stop:
                break
            tokens.append(t.item())
            text = tokenizer.decode(tokens)  # all so far: a character may span several tokens
            print(text[len(shown) :], end="", flush=True)
            shown = text
        print()
        conversation.append({"from": "gpt", "value": shown.strip()})
        if prompt is not None:
            return conversation


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="tinyllava: chat with a trained model or evaluate it")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("chat", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="checkpoint directory (e.g. runs/sft)")
        p.add_argument("--template",
                       help="conversation template (default: the one the model was trained with)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--max-new-tokens", type=int, default=256 if name == "chat" else 32)
        if name == "chat":
            p.add_argument("--image", help="image file to talk about")
            p.add_argument("--prompt",
                           help="ask this once and exit, instead of an interactive chat")
            p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        else:
            p.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL; "
                           "the last turn of each sample is the reference")
            p.add_argument("--image-folder", help="default: the data file's folder")
            p.add_argument("--batch-size", type=int, default=64)
            p.add_argument("--out", help="answers JSONL (default: MODEL/answers.jsonl)")
    args = parser.parse_args(argv)
    if args.command == "chat":
        chat(args.model, image_file=args.image, prompt=args.prompt, device=args.device,
             template=args.template, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature)
    else:
        evaluate(args.model, args.data, image_folder=args.image_folder, batch_size=args.batch_size,
                 out=args.out, device=args.device, template=args.template,
                 max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    command_line(main)
