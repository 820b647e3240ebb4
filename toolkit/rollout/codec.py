"""What the rollout core needs from a tokenizer: exact per-token text, encoding, and the special ids.

`TokenCodec` is the protocol; `HFTokenCodec` adapts a HF fast tokenizer; `ToyCodec` is a small
pure-Python tokenizer for tests whose vocabulary has multi-character punctuation runs (`"]}, "`, `}}`)
so tokens straddle object boundaries the way real BPE merges do.

The parser's character frame is `"".join(codec.pieces(ids))`: every offset it reports indexes that text.
Imports nothing heavy (no torch; transformers is never imported, the tokenizer object is passed in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Protocol, runtime_checkable

from toolkit.data.coords import COORD_PATTERN, COORD_TOKENS, NUM_BINS
from toolkit.data.render import render_answer

IM_END = "<|im_end|>"
IM_START = "<|im_start|>"
PAD = "<|endoftext|>"
# Splits text at the coord tokens and keeps them (`re.split` with the whole token as its one group).
_COORD_SPLIT_RE = re.compile(f"({COORD_PATTERN})")


@runtime_checkable
class TokenCodec(Protocol):
    """The tokenizer surface the parser and target builders use.

    im_end_id:        the end-of-turn id (a hard stop for parsing; the last token of every segment).
    coord_token_ids:  the 1000 coordinate-token ids, indexed by bin.
    coord_bin_of:     id → bin of those ids (`coord_bin` as a mapping: whole id lists are looked up in C with
                      `map(coord_bin_of.__contains__, ids)`, not one method call per token).
    """

    im_end_id: int
    coord_token_ids: Sequence[int]
    coord_bin_of: Mapping[int, int]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """The exact text of each token; `"".join(pieces(ids))` is the decoded text."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def coord_bin(self, token_id: int) -> int | None:
        """Bin (0..999) of a coordinate-token id, else None."""

    def object_key_token_ids(self) -> list[int]:
        """Ids of the tokens that spell `object_` (used to count opened object keys during decoding)."""


class _CoordTable:
    """Shared coord-id bookkeeping (bin lookup, validation)."""

    def _init_coords(self, coord_ids: Sequence[int]) -> None:
        ids = tuple(int(i) for i in coord_ids)
        if len(ids) != NUM_BINS or len(set(ids)) != NUM_BINS:
            raise ValueError(f"expected {NUM_BINS} distinct coordinate-token ids, got {len(set(ids))}")
        self.coord_token_ids = ids
        self.coord_bin_of = {t: k for k, t in enumerate(ids)}

    def coord_bin(self, token_id: int) -> int | None:
        return self.coord_bin_of.get(token_id)


# Texts that exercise what the parser relies on: punctuation runs, spaces, coords, escapes. ASCII only:
# a vocabulary without byte fallback maps other characters to <unk>, which says nothing about its mapping.
_PROBE_TEXTS = (
    render_answer(
        [{"desc": "red car", "bbox_2d": [1, 2, 30, 400]}, {"desc": 'a "b" c', "bbox_2d": [5, 6, 999, 999]}],
        ordering="given",
    ),
    '{"object_12": {"bbox_2d": ["<|coord_0|>"], "desc": "x y"}, ',
    "hello world {}",
)


class _LiteralPieces(dict):
    """id → token text of a literal vocabulary ("" for an id it does not know), filled on first use: the
    parser asks for the pieces of every rollout, and a dict lookup per id is several times cheaper than
    `convert_ids_to_tokens`' Python loop (docs/PERFORMANCE.md)."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer

    def __missing__(self, key) -> str:
        # `pieces` looks ids up as given (an int() per id would be one more pass over every rollout): a key that
        # is no cached int lands here and gets the piece of int(key); only plain ints are cached.
        tid = int(key)
        piece = self.get(tid)
        if piece is None:
            piece = self[tid] = self.tok.convert_ids_to_tokens([tid])[0] or ""
        return piece


class _PartIds(dict):
    """text → its ids, filled on first use, emptied when it holds `MAX` texts (an LVIS-sized vocabulary of descs
    times object numbers would otherwise grow it without end). Looked up in C; a dict, so a codec still pickles."""

    MAX = 1 << 14

    def __init__(self, encode):
        super().__init__()
        self.encode = encode

    def __missing__(self, text: str) -> tuple[int, ...]:
        if len(self) >= self.MAX:
            self.clear()
        ids = self[text] = tuple(self.encode(text))
        return ids


class HFTokenCodec(_CoordTable):
    """A `PreTrainedTokenizerFast` as a TokenCodec.

    Token text comes from `convert_ids_to_tokens` when the vocabulary is literal text (the project's
    BPE): checked once at construction by round-tripping probe strings. Otherwise (byte-level, Metaspace)
    each piece is decoded per token against an anchor token, and when those pieces do not reassemble the
    sequence's decode (a character split over several byte tokens) the pieces are recomputed by
    incremental decoding, giving the completing token the whole character and the others "".

    Raises:
        ValueError: when `<|im_end|>` or one of the 1000 `<|coord_k|>` tokens is not a single token, or
            when encoding is not text-faithful (`"".join(pieces(encode(t))) != t` on probe texts).
    """

    def __init__(self, tokenizer, *, im_end_token: str = IM_END):
        self.tok = tokenizer
        self.im_end_id = self._single_id(im_end_token)
        self._init_coords([self._single_id(t) for t in COORD_TOKENS])
        self._part_ids = _PartIds(self._encode_whole)
        self._split_at_coords = self._coords_split_first()
        self.literal = all(self._literal_roundtrip(t) for t in _PROBE_TEXTS)
        self._anchor = (self.encode("a") or [self.im_end_id])[-1]
        self._anchor_text = self._decode([self._anchor])
        self._piece_cache: dict[int, str] = {}
        self._literal_pieces = _LiteralPieces(tokenizer)
        self._key_ids: list[int] | None = None
        for text in _PROBE_TEXTS + ('"]}', "}"):
            if "".join(self.pieces(self.encode(text))) != text:
                raise ValueError(
                    f"tokenizer encode/decode is not text-faithful: {text!r} comes back as "
                    f"{''.join(self.pieces(self.encode(text)))!r} (e.g. a Metaspace pre-tokenizer that prepends a "
                    "space); the rollout parser re-encodes cut tokens and needs pieces(encode(t)) == t"
                )

    def _single_id(self, token: str) -> int:
        tid = self.tok.convert_tokens_to_ids(token)
        if tid is None or tid == self.tok.unk_token_id or self.tok.encode(token, add_special_tokens=False) != [tid]:
            raise ValueError(f"tokenizer has no single token for {token!r} (fix: add it as a special/added token)")
        return int(tid)

    def _literal_roundtrip(self, text: str) -> bool:
        ids = self.encode(text)
        return "".join(t or "" for t in self.tok.convert_ids_to_tokens(ids)) == text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        if self._split_at_coords and "<|coord_" in text and self._backend_as_wrapper(split_special=False):
            # The tokenizer splits text at added tokens before anything else, so the text between coord tokens is
            # encoded alone: answers repeat those parts (`", "`, `"]}, "object_12": {"desc": "cat", "bbox_2d": ["`),
            # and each is encoded once (docs/PERFORMANCE.md, item 3).
            return list(chain.from_iterable(map(self._part_ids.__getitem__, _COORD_SPLIT_RE.split(text))))
        return self._encode_whole(text)

    def _encode_whole(self, text: str) -> list[int]:
        if self._backend_as_wrapper():
            # The Rust tokenizer in the state `tok.encode` would put it in (no truncation, no padding, special
            # tokens as the wrapper says): the same ids without the wrapper's per-call Python (docs/PERFORMANCE.md)
            return self.tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return [int(i) for i in self.tok.encode(text, add_special_tokens=False)]

    def _backend_as_wrapper(self, split_special: bool | None = None) -> bool:
        """Whether the Rust tokenizer is in the state `tok.encode` would put it in (and, if given, splits special
        tokens or not: the cached parts were encoded with them whole)."""
        backend = getattr(self.tok, "backend_tokenizer", None)
        return (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(self.tok, "split_special_tokens", False))
            and split_special in (None, backend.encode_special_tokens)
        )

    def _coords_split_first(self) -> bool:
        """Whether the tokenizer cuts text at every coord token before it does anything else, whatever surrounds it,
        and then encodes each part alone: the coord tokens are added tokens matched in the raw text (not normalized,
        or there is no normalizer: NFC would compose `>` with a combining mark after it), that neither take the
        spaces around them (lstrip, rstrip) nor wait for a word boundary (single_word), are not special
        (`split_special_tokens` would keep a special one whole), and no other added token can overlap one (contain
        it, sit inside it, or share a prefix with its suffix)."""
        added = getattr(self.tok, "added_tokens_decoder", None) or {}
        coords = [added.get(t) for t in self.coord_token_ids]
        raw = getattr(self.tok, "backend_tokenizer", None) is not None and self.tok.backend_tokenizer.normalizer is None
        if any(a is None or a.lstrip or a.rstrip or a.single_word or a.special for a in coords):
            return False
        if not raw and any(a.normalized for a in coords):
            return False
        texts = [a.content for a in coords]
        heads = {c[:k] for c in texts for k in range(1, len(c))}
        tails = {c[k:] for c in texts for k in range(1, len(c))}
        for tid, a in added.items():
            x = a.content
            if tid in self.coord_bin_of or not x:
                continue
            if any(x[-k:] in heads or x[:k] in tails for k in range(1, len(x) + 1)):
                return False
            if "<|coord_" in x or any(x in c for c in texts):
                return False
        return True

    def pieces(self, ids: Sequence[int]) -> list[str]:
        if self.literal:  # int(id) when needed: `_LiteralPieces`
            if len(ids) < 2:  # itemgetter of one id gives the piece, not a tuple
                return list(map(self._literal_pieces.__getitem__, ids))
            return list(itemgetter(*ids)(self._literal_pieces))  # the look-ups in one C call, not one call per id
        ids = list(map(int, ids))
        out = [self._piece(i) for i in ids]
        if "".join(out) == self._decode(ids):
            return out
        return self._incremental_pieces(ids)

    def _piece(self, tid: int) -> str:
        piece = self._piece_cache.get(tid)
        if piece is None:
            both = self._decode([self._anchor, tid])
            piece = both[len(self._anchor_text) :] if both.startswith(self._anchor_text) else self._decode([tid])
            self._piece_cache[tid] = piece
        return piece

    def _incremental_pieces(self, ids: list[int]) -> list[str]:
        # O(n^2) decodes, only reached for byte-level text that splits characters across tokens.
        out, prev = [], ""
        for k in range(len(ids)):
            cur = self._decode(ids[: k + 1])
            if cur.startswith(prev) and not cur.endswith("\ufffd"):
                out.append(cur[len(prev) :])
                prev = cur
            else:
                out.append("")
        full = self._decode(ids)
        if out and full.startswith(prev):
            out[-1] += full[len(prev) :]
        return out

    def object_key_token_ids(self) -> list[int]:
        if self._key_ids is None:
            vocab = self.tok.get_vocab()
            text = {i: (t if self.literal else self._piece(i)) for t, i in vocab.items()}
            hits = sorted(i for i, t in text.items() if "object_" in t)
            self._key_ids = hits or sorted(i for i, t in text.items() if "object" in t)
        return list(self._key_ids)


class ToyCodec(_CoordTable):
    """A deterministic pure-Python tokenizer for tests (greedy longest match, any text encodable).

    Ids: 0 `<|im_end|>`, 1 `<|im_start|>`, 2 `<|endoftext|>`, 3..1002 `<|coord_0|>`..`<|coord_999|>`,
    then the multi-character vocabulary below, then one id per Unicode code point (`CHAR_BASE + ord(c)`).
    """

    MULTI = (
        '{"object_',
        ', "object_',
        '"object_',
        "object_",
        '": {"desc": "',
        '": {"bbox_2d": ["',
        '", "bbox_2d": ["',
        '"], "desc": "',
        '"]}, "',
        '"]}}',
        '"]}',
        '"}, "',
        '"}}',
        '"}',
        "}}",
        '}, "',
        "}, ",
        '", "',
        '{"',
        '": "',
        '": ["',
        '": ',
        ", ",
        "desc",
        "bbox_2d",
        "poly",
        "cat",
        "dog",
        "red ",
        "person",
    )
    SPECIALS = (IM_END, IM_START, PAD)

    def __init__(self):
        self.im_end_id = 0
        self._init_coords(range(3, 3 + NUM_BINS))
        self.multi_base = 3 + NUM_BINS
        self.char_base = self.multi_base + len(self.MULTI)
        self.vocab_size = self.char_base + 0x110000
        self._id_of = {t: i for i, t in enumerate(self.SPECIALS)}
        self._id_of.update({t: 3 + k for k, t in enumerate(COORD_TOKENS)})
        self._id_of.update({t: self.multi_base + k for k, t in enumerate(self.MULTI)})
        self._text_of = {i: t for t, i in self._id_of.items()}
        # Python's alternation is ordered, so longest first; all coord tokens share one branch (fast).
        alts = [re.escape(a) for a in sorted((*self.SPECIALS, *self.MULTI), key=len, reverse=True)]
        self._re = re.compile(COORD_PATTERN + "|" + "|".join(alts) + "|.", re.S)

    def encode(self, text: str) -> list[int]:
        ids = []
        for m in self._re.finditer(text):
            s = m.group()
            tid = self._id_of.get(s)
            ids.append(tid if tid is not None else self.char_base + ord(s))
        return ids

    def pieces(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            t = self._text_of.get(i)
            if t is None:
                if not self.char_base <= i < self.vocab_size:
                    raise ValueError(f"ToyCodec: token id {i} outside the vocabulary [0, {self.vocab_size})")
                t = chr(i - self.char_base)
            out.append(t)
        return out

    def object_key_token_ids(self) -> list[int]:
        return sorted(i for t, i in self._id_of.items() if "object_" in t)
