"""Tokenizer loading and the two prompt encoders the trainer and the rollout side must share.

`encode_prompt` is what generation sees; `encode_teacher` is exactly `encode_prompt(...) + tokens(answer) +
[<|im_end|>]`, so a teacher-forced sequence starts with the very ids a rollout was generated from.
transformers is imported inside functions only (this module sits in `toolkit/data`, which config-side
code may import).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, UNK)

# Qwen-style chat template: `<|im_start|>role\ncontent<|im_end|>\n` per message, then the open assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_tokenizer(path: str | Path):
    """Load a saved tokenizer as `PreTrainedTokenizerFast`, left-padded for batched generation.

    Raises:
        ValueError: if the tokenizer lacks `<|im_end|>`, a pad token or a chat template.
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    problems = []
    if tok.convert_tokens_to_ids(IM_END) in (None, tok.unk_token_id):
        problems.append(f"no {IM_END} token")
    if tok.pad_token_id is None:
        problems.append("no pad token")
    if not tok.chat_template:
        problems.append("no chat_template")
    if problems:
        raise ValueError(f"tokenizer at {path}: {', '.join(problems)} (fix: rebuild it with assets/build_assets.py)")
    return tok


def im_end_id(tok) -> int:
    """Id of `<|im_end|>`, the end-of-turn token every answer ends with."""
    return tok.convert_tokens_to_ids(IM_END)


def encode_prompt(tok, messages: Sequence[dict]) -> list[int]:
    """Prompt ids: the chat template over `messages` plus the open assistant turn (`<|im_start|>assistant\\n`)."""
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def encode_answer(tok, answer_text: str) -> list[int]:
    """Ids of the answer text alone (no end-of-turn token)."""
    return tok.encode(answer_text, add_special_tokens=False)


def encode_teacher(tok, messages: Sequence[dict], answer_text: str) -> tuple[list[int], int]:
    """Teacher-forcing ids and prompt length: `encode_prompt(...) + encode_answer(answer) + [<|im_end|>]`."""
    prompt = encode_prompt(tok, messages)
    return prompt + encode_answer(tok, answer_text) + [im_end_id(tok)], len(prompt)
