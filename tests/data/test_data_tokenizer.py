"""The committed tokenizer: literal-text tokens, single-token coordinates, prompt/teacher parity."""

from __future__ import annotations

import pytest

from toolkit.data.coords import COORD_TOKENS, coord_token
from toolkit.data.render import render_answer, render_entries, render_messages
from toolkit.data.tokenizer import (
    IM_END,
    IM_START,
    PAD,
    encode_answer,
    encode_prompt,
    encode_teacher,
    im_end_id,
    load_tokenizer,
)


def test_special_ids_and_padding(tok):
    assert tok.convert_tokens_to_ids([PAD, IM_START, IM_END]) == [0, 1, 2]
    assert tok.pad_token_id == 0 and tok.eos_token_id == im_end_id(tok) == 2
    assert tok.padding_side == "left"
    enc = tok.pad({"input_ids": [[5, 6, 7], [8]]}, padding=True)
    assert enc["input_ids"][1] == [0, 0, 8] and enc["attention_mask"][1] == [0, 0, 1]


def test_coord_tokens_are_single_contiguous_non_special_tokens(tok):
    ids = [tok.encode(t, add_special_tokens=False) for t in COORD_TOKENS]
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert flat == list(range(flat[0], flat[0] + 1000))
    # skip_special_tokens must keep coordinates (the rollout parser needs them).
    assert tok.decode(flat[:3], skip_special_tokens=True) == "".join(COORD_TOKENS[:3])


def test_teacher_is_prompt_plus_answer_plus_im_end_on_every_val_record(tok, val_records):
    for rec in val_records:
        messages = render_messages(rec.scene)
        answer = render_answer(rec.objects)
        prompt = encode_prompt(tok, messages)
        ids, prompt_len = encode_teacher(tok, messages, answer)
        assert prompt_len == len(prompt)
        assert ids == prompt + tok.encode(answer, add_special_tokens=False) + [im_end_id(tok)]
        # The same ids as tokenizing the whole conversation text at once: no merge crosses the boundary.
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ids == tok.encode(text + answer + IM_END, add_special_tokens=False), rec.id


def test_round_trip_and_literal_token_texts(tok, val_records):
    for rec in val_records:
        answer = render_answer(rec.objects)
        ids = encode_answer(tok, answer)
        assert tok.decode(ids) == answer
        assert "".join(tok.convert_ids_to_tokens(ids)) == answer
        full, _ = encode_teacher(tok, render_messages(rec.scene), answer)
        assert "".join(tok.convert_ids_to_tokens(full)) == tok.decode(full)


@pytest.mark.parametrize(
    "text",
    [
        '{"object_12": {"bbox_2d": ["<|coord_0|>", "<|coord_999|>"], "desc": "traffic light"}}',
        "{}",
        "Odd ASCII: ~`!@#$%^&*()[]{}|\\;:'\",.<>/? \t tabs\nnew lines",
    ],
)
def test_round_trip_outside_the_training_distribution(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_json_punctuation_runs_are_fused(tok):
    objects = [{"desc": "cat", "bbox_2d": [10, 20, 30, 40]}, {"desc": "dog", "bbox_2d": [50, 60, 70, 80]}]
    pieces = tok.convert_ids_to_tokens(encode_answer(tok, render_answer(objects)))
    for run in ['": {"', '": "', '", "', '": ["', '"]}, "', '"]}}']:
        assert run in pieces
    one, two = (len(encode_answer(tok, render_answer(objects[:n]))) for n in (1, 2))
    assert two - one == 16  # tokens per extra object inside an answer (4 of them coordinates)
    # The FN-append fragment adds its own leading quote: `"` + object_2 + ... + `"]}`.
    assert len(encode_answer(tok, render_entries(objects[1:], 2))) == 17


def test_autotokenizer_on_stage1_matches_load_tokenizer(assets_dir, tok, val_records):
    from transformers import AutoTokenizer

    text = tok.apply_chat_template(render_messages(val_records[0].scene), tokenize=False, add_generation_prompt=True)
    text += render_answer(val_records[0].objects)
    expected = tok.encode(text, add_special_tokens=False)
    for folder in ("stage1", "tokenizer"):
        for trust in (False, True):
            auto = AutoTokenizer.from_pretrained(str(assets_dir / folder), trust_remote_code=trust)
            assert auto.encode(text, add_special_tokens=False) == expected, (folder, trust)
            assert auto.decode(expected) == text
    assert load_tokenizer(assets_dir / "stage1").encode(text, add_special_tokens=False) == expected


def test_coord_token_helper_matches_vocab(tok):
    assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(coord_token(517))) == coord_token(517)
