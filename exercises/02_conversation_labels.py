"""Exercise 2: input_ids and labels for a multi-turn conversation (vicuna_v1).
Task: exercises/02_conversation_labels.md
Check: python exercises/check.py 2"""

IMAGE_TOKEN_INDEX = -200  # the one id that stands for the whole image
IGNORE_INDEX = -100  # label of a token that is not trained
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def tokenize_vicuna(conversations, tokenizer):
    """conversations: [{"from": "system"|"human"|"gpt", "value": str}, ...] (an optional system
    turn, then human and gpt alternating, ending with gpt; "<image>" may appear once, in the first
    human turn).
    tokenizer: has encode(text) -> list of ids (never adds special tokens), bos_id, eos_id, add_bos.

    Return (input_ids, labels): two lists of ints of the same length, built piece by piece as the
    task statement lists; labels are the ids of the answers and their end tokens, -100 everywhere
    else."""
    raise NotImplementedError
