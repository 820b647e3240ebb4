"""ToyCodec behaves like a literal-text BPE: exact pieces, straddling punctuation runs, whole special tokens."""

from toolkit.data.coords import COORD_TOKENS
from toolkit.data.render import render_answer
from toolkit.rollout.codec import TokenCodec


def test_roundtrip_and_straddling_tokens(codec):
    text = render_answer(
        [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}, {"desc": "dog", "bbox_2d": [5, 6, 7, 8]}], ordering="given"
    )
    ids = codec.encode(text)
    pieces = codec.pieces(ids)
    assert "".join(pieces) == text
    assert '"]}, "' in pieces and '"]}}' in pieces  # tokens cross object boundaries, like BPE merges
    assert [codec.coord_bin(i) for i in ids if codec.coord_bin(i) is not None] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_specials_and_arbitrary_text(codec):
    assert codec.encode("<|im_end|>") == [codec.im_end_id]
    assert codec.pieces(codec.coord_token_ids[:2]) == list(COORD_TOKENS[:2])
    assert codec.coord_bin(codec.im_end_id) is None
    for text in ["", "héllo \u2028 😀 \ud800", "<|coord_1000|><|coord_01|>", '\\"{']:
        assert "".join(codec.pieces(codec.encode(text))) == text
    assert codec.coord_bin(codec.encode("<|coord_1000|>")[0]) is None
    assert isinstance(codec, TokenCodec)
    assert all("object_" in codec.pieces([i])[0] for i in codec.object_key_token_ids())
