"""Exercise 2: input_ids and labels for a multi-turn conversation (vicuna_v1)."""

from .framework import describe, exercise
from .toy import IGNORE, IMAGE

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What color is the circle? ASSISTANT: The circle is red.",
    "USER: How many shapes are there? ASSISTANT: There are 3 shapes.",
    "USER: Is there a blue square? ASSISTANT: yes, a small blue square at the top left.",
    "What is the capital of France? Paris. What is 2 + 3? 5.",
]


def tiny_tokenizer(add_bos):
    """A byte-level BPE (GPT-2 / SmolLM2 style) trained here, wrapped as data.load_tokenizer
    would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import data

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return data.Tokenizer(tok, bos_id=1, eos_id=2, pad_id=2, add_bos=add_bos)


CONVERSATIONS = {
    "one turn with an image": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "The circle is red."}],
    "three turns, the <image> tag written after the question": [
        {"from": "human", "value": "How many shapes are there?\n<image>"},
        {"from": "gpt", "value": "There are 3 shapes."},
        {"from": "human", "value": "Is there a blue square?"},
        {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "What color is the circle?"},
        {"from": "gpt", "value": "The circle is red."}],
    "text only, with its own system prompt": [
        {"from": "system", "value": "Answer in one word."},
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "What is 2 + 3?"},
        {"from": "gpt", "value": "5."}],
}


def ids_hint(ids, want_ids, tok, add_bos):
    """Why the ids differ from data.tokenize_conversation's, for the mistakes the checker knows."""
    import data

    whole = tok.encode(data.TEMPLATES["vicuna_v1"].system + " ")  # the system text as one piece
    if add_bos and (not ids or ids[0] != tok.bos_id):
        return (f"this tokenizer has add_bos=True: start with tokenizer.bos_id ({tok.bos_id}), "
                "untrained")
    if not add_bos and ids and ids[0] == tok.bos_id:
        return "this tokenizer has add_bos=False: do not prepend a BOS"
    if IMAGE in want_ids and IMAGE not in ids:
        return ("'<image>' must become the single id -200 (split the text on '<image>'), "
                "not be tokenized as text")
    n = len(whole) + add_bos
    if ids[:n] != want_ids[:n] and ids[add_bos:add_bos + len(whole)] != whole:
        return ("tokenize piece by piece exactly as the statement lists them "
                "(the system prompt plus its space is one piece)")
    return ("tokenize each piece on its own (merging across pieces changes the tokens); "
            "see the statement's list of pieces")


@exercise(2, "02_conversation_labels", "tokenize_vicuna",
          "labels for a multi-turn conversation (vicuna_v1)")
def check_conversation_labels(fn, c):
    import data

    for add_bos in (False, True):
        tok = tiny_tokenizer(add_bos)
        if add_bos:
            kind = "a tokenizer that adds BOS (Llama-like)"
        else:
            kind = "a tokenizer without BOS (SmolLM2-like)"
        for name, conv in CONVERSATIONS.items():
            want_ids, want_labels = data.tokenize_conversation([dict(t) for t in conv], tok,
                                                               "vicuna_v1")
            out = fn([dict(t) for t in conv], tok)
            ok = isinstance(out, tuple) and len(out) == 2
            c.check(f"[{name}] returns (input_ids, labels)", ok, expected="a tuple of two lists",
                    got=describe(out))
            ids, labels = [[int(i) for i in x] for x in out]
            c.check(f"[{name}] input_ids and labels have the same length", len(ids) == len(labels),
                    expected="equal lengths (labels are aligned with the ids; the model shifts "
                             "them)",
                    got=f"{len(ids)} ids, {len(labels)} labels")
            pairs = list(zip(ids, labels))
            c.check(f"[{name}] every label is its token's id or -100",
                    all(lab in (i, IGNORE) for i, lab in pairs),
                    expected="labels[t] == input_ids[t] (trained) or -100 (masked)",
                    got=lambda: next(f"position {t}: id {i}, label {lab}"
                                     for t, (i, lab) in enumerate(pairs) if lab not in (i, IGNORE)),
                    hint="do not shift the labels yourself: shifted_cross_entropy does it")

            def trained(i, lab):  # the text of the trained tokens
                return tok.decode([t for t, x in zip(i, lab) if x != IGNORE])
            c.check(f"[{name}] exactly the answers and their </s> are trained",
                    trained(ids, labels) == trained(want_ids, want_labels),
                    expected=repr(trained(want_ids, want_labels)), got=repr(trained(ids, labels)),
                    hint="train each answer ' {answer}' and the EOS id after it; everything else "
                         "(system, USER: ..., ASSISTANT:, <image>) is -100")
            if ids != want_ids:
                t = next((k for k, (a, b) in enumerate(zip(ids, want_ids)) if a != b),
                         min(len(ids), len(want_ids)))

                def around(x):  # six ids from the first difference, and their text
                    return f"{x[t:t + 6]} = {tok.decode([i for i in x[t:t + 6] if i >= 0])!r}"
                c.check(f"[{name}] input_ids equal data.tokenize_conversation's with {kind}", False,
                        expected=f"{len(want_ids)} ids; at position {t}: {around(want_ids)}",
                        got=f"{len(ids)} ids; at position {t}: {around(ids)}",
                        hint=ids_hint(ids, want_ids, tok, add_bos))
            c.check(f"[{name}] input_ids and labels equal data.tokenize_conversation's with {kind}",
                    labels == want_labels, expected=data.render_mask(want_ids, want_labels, tok),
                    got=data.render_mask(ids, labels, tok))
    conv = CONVERSATIONS["three turns, the <image> tag written after the question"]
    ids, labels = fn([dict(t) for t in conv], tok)
    print("  the mask viewer (python data.py show) on your multi-turn sample, [trained] tokens in "
          "brackets:")
    c.show(data.render_mask(list(ids), list(labels), tok))
