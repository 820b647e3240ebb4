"""`stage2 data check`: every problem of a records file at once, then the statistics a researcher wants
before a run (docs/DATA.md, "Checking a dataset").

Statistics: records, objects per record (histogram), box sizes in bins (the short side; boxes under 20 bins
are the matching gate's hard case), images missing / of the wrong size / unreadable, poly objects; with a
profile, answer lengths in tokens against rollout_matching.max_new_tokens (rollouts that cannot finish the
answer) and prompt + answer against global_max_length (Channel-A drops them as too_long). Imports nothing heavy
until a profile asks for token lengths.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from toolkit.data.records import Record, RecordIssue, read_records

OBJECT_EDGES = (1, 6, 11, 21, 41, 61)  # histogram buckets: 0, 1-5, 6-10, 11-20, 21-40, 41-60, 61+
SIZE_EDGES = (5, 10, 20, 50, 100, 250, 500)  # short box side in bins: <5, 5-9, ..., 500+
SMALL_BOX_BINS = 20
TOKEN_EDGES = (256, 512, 1024, 2048, 4096)


def _bucket_names(edges: tuple[int, ...], first: int = 0) -> list[str]:
    lows = (first, *edges)
    names = [f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo) for lo, hi in zip(lows, edges)]
    return names + [f"{edges[-1]}+"]


def histogram(values, edges: tuple[int, ...]) -> dict[str, int]:
    """Counts of `values` per bucket [edge_k, edge_k+1), with a first bucket below edges[0] and an open last one."""
    counts = Counter(bisect.bisect_right(edges, v) for v in values)
    return {name: counts.get(k, 0) for k, name in enumerate(_bucket_names(edges))}


def _image_kind(issue: RecordIssue) -> str | None:
    msg = issue.message
    if msg.startswith("image "):
        for needle, kind in (
            ("not found", "missing"),
            ("pixels but the record says", "wrong size"),
            ("truncated", "truncated"),
            ("too large", "too large"),
            ("not a readable", "unreadable"),
            ("does not decode", "does not decode"),
        ):
            if needle in msg:
                return kind
    return None


@dataclass
class CheckReport:
    path: str
    issues: list[RecordIssue]
    records: int = 0
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.issues

    def lines(self) -> list[str]:
        out = [str(i) for i in self.issues]
        out.append(f"{self.path}: {self.records} valid record(s), {len(self.issues)} problem(s)")
        for key, value in self.stats.items():
            if isinstance(value, dict):
                out.append(f"{key}:")
                out += [f"  {k:>10}: {v}" for k, v in value.items()]
            else:
                out.append(f"{key}: {value}")
        return out


def record_stats(records: list[Record], issues: list[RecordIssue]) -> dict:
    sides = [
        min(o["bbox_2d"][2] - o["bbox_2d"][0], o["bbox_2d"][3] - o["bbox_2d"][1]) for r in records for o in r.objects
    ]
    small = sum(s < SMALL_BOX_BINS for s in sides)
    image_problems = Counter(k for k in map(_image_kind, issues) if k)
    stats = {
        "records": len(records),
        "image records": sum(r.is_image for r in records),
        "objects": len(sides),
        "objects per record": histogram([len(r.objects) for r in records], OBJECT_EDGES),
        "box short side (bins)": histogram(sides, SIZE_EDGES),
        f"boxes under {SMALL_BOX_BINS} bins": f"{small} ({100 * small / max(1, len(sides)):.1f}%)",
        "poly objects dropped": sum(r.dropped_poly for r in records),
        "images with problems": dict(sorted(image_problems.items())) or 0,
        "chat control tokens (lines)": sum("chat control token" in i.message for i in issues),
    }
    return stats


def token_stats(records: list[Record], cfg) -> dict:
    """Answer and sequence lengths in tokens with the profile's tokenizer, template and limits (as the trainer)."""
    from toolkit.data.render import SYSTEM_PROMPT, render_answer, render_messages
    from toolkit.data.tokenizer import encode_answer, encode_prompt, load_tokenizer
    from toolkit.trainer.samples import image_messages
    from toolkit.vlm.inputs import VisionProcessor, image_pad_id

    tok = load_tokenizer(cfg.model.model)
    vision = VisionProcessor(cfg.model.model) if image_pad_id(cfg.model.model) is not None else None
    t = cfg.template
    system = SYSTEM_PROMPT if t.system_prompt is None else t.system_prompt
    image_prompt: dict[tuple[int, int], int] = {}  # prompt length per image size (same text, same grid)

    def prompt_len(rec: Record) -> int:
        if not rec.is_image:
            return len(encode_prompt(tok, render_messages(rec.scene, system)))
        if (rec.width, rec.height) not in image_prompt:
            grids = (vision.grid_for_size(rec.width, rec.height),)
            prompt = encode_prompt(tok, image_messages(1, system))
            image_prompt[rec.width, rec.height] = len(vision.expand(prompt, grids))
        return image_prompt[rec.width, rec.height]

    usable = [r for r in records if vision is not None or not r.is_image]
    answers = [
        len(encode_answer(tok, render_answer(r.objects, t.object_field_order, t.object_ordering))) + 1 for r in usable
    ]
    totals = [prompt_len(r) + a for r, a in zip(usable, answers)]
    max_new, max_len = cfg.rollout_matching.max_new_tokens, cfg.global_max_length
    return {
        "answer tokens (with <|im_end|>)": histogram(answers, TOKEN_EDGES),
        "answer tokens max": max(answers, default=0),
        f"answers over max_new_tokens={max_new} (rollouts truncated)": sum(a > max_new for a in answers),
        f"prompt+answer over global_max_length={max_len} (Channel-A drops as too_long)": sum(
            n > max_len for n in totals
        ),
        "image records on a model without a vision tower": len(records) - len(usable),
    }


def decode_issues(records: list[Record]) -> list[RecordIssue]:
    """Decode every image in full: finds damage inside a complete file, which the loader's cheap checks cannot."""
    from PIL import Image

    issues = []
    for rec in records:
        for entry, path in zip(rec.image_entries, rec.images):
            try:
                with Image.open(path) as im:
                    im.load()
            except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what PIL's decoders raise
                issues.append(
                    RecordIssue(
                        rec.file,
                        rec.line,
                        f"image {entry!r} at {path} does not decode: {exc}",
                        "re-export or re-copy the file",
                    )
                )
    return issues


def check_dataset(
    path: str,
    *,
    cfg=None,
    image_root: str | None = None,
    bbox_format: str = "norm1000",
    poly_policy: str = "error",
    decode: bool = False,
) -> CheckReport:
    """Check `path`: all problems, record statistics, and token statistics when a resolved profile `cfg` is given
    (its data.image_root / bbox_format / poly_policy then apply); `decode` decodes every image in full."""
    if cfg is not None:
        image_root, bbox_format, poly_policy = cfg.data.image_root, cfg.data.bbox_format, cfg.data.poly_policy
    records, issues = read_records(path, image_root=image_root, bbox_format=bbox_format, poly_policy=poly_policy)
    if decode:
        issues += decode_issues(records)
    report = CheckReport(str(path), issues, len(records), record_stats(records, issues))
    if cfg is not None and records:
        report.stats.update(token_stats(records, cfg))
        if report.stats["image records on a model without a vision tower"]:
            report.issues += [
                RecordIssue(
                    r.file,
                    r.line,
                    f"record {r.id!r} has images but the model has no vision tower",
                    "point model.model at a Qwen-VL folder, or use text records",
                )
                for r in records
                if r.is_image
            ]
    return report
