"""Build the embedded default assets, deterministically: tokenizer, synthetic data, tiny Qwen2 init, Stage-1,
and the VLM set: shape images, tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (the last two: vlm_families.py), Stage-1s.

    python assets/build_assets.py                          # everything into assets/ (~30 min on one CPU thread)
    python assets/build_assets.py --only tokenizer,data,model --out /tmp/a   # the fast part (seconds)
    python assets/build_assets.py --only stage1 --stage1-steps 50 --out /tmp/a   # a short Stage-1 smoke

Each part reads what the earlier parts wrote under --out (stage1 needs tokenizer, data and model), so a
partial rebuild into a fresh folder must include the parts it depends on. Fixed seeds, fixed step counts,
one thread and deterministic torch algorithms: the same command gives the same bytes on this machine.
See assets/README.md for what each asset is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root, for toolkit.data
sys.path.insert(0, str(HERE))  # stage1.py

from toolkit.data.coords import COORD_TOKENS, pixel_to_bin  # noqa: E402
from toolkit.data.records import dump_records, load_records  # noqa: E402
from toolkit.data.render import (  # noqa: E402
    SYSTEM_PROMPT,
    USER_INSTRUCTION,
    canonical_order,
    render_answer,
    render_messages,
)
from toolkit.data.tokenizer import CHAT_TEMPLATE, IM_END, PAD, SPECIAL_TOKENS, UNK  # noqa: E402

PARTS = (
    "tokenizer",
    "data",
    "model",
    "stage1",
    "vlm_data",
    "vlm_model",
    "vlm_stage1",
    "qwen2_5_vl_model",
    "qwen2_5_vl_stage1",
    "qwen3_vl_model",
    "qwen3_vl_stage1",
)  # the last four: vlm_families.py
OPT_IN_PARTS = ("lvis_synth",)  # built only when named in --only; not committed (toolkit/data/synth_lvis.py)

# ---- synthetic data -------------------------------------------------------------------------------------
CLASSES = (
    "cat",
    "dog",
    "car",
    "tree",
    "person",
    "bird",
    "boat",
    "chair",
    "cup",
    "book",
    "lamp",
    "bus",
    "horse",
    "ball",
    "clock",
    "bottle",
)
DATA = {
    "seed": 20261123,
    "n_train": 8000,
    "n_val": 128,
    "grid": 10,  # every coordinate is a multiple of this (coarse grid = more copies per token)
    "min_objects": 1,
    "max_objects": 4,
    "min_size": 60,  # box width/height range, in bins
    "max_size": 400,
    "scene_order": "sorted",  # or "shuffled"; sorted = the answer order (see assets/README.md for why)
}


def make_objects(rng: random.Random, n: int, cfg: dict) -> list[dict]:
    """n random boxes on the coordinate grid, fully inside 0..999, with random classes."""
    g = cfg["grid"]
    top = 999 // g  # highest grid index that stays inside 0..999
    objects = []
    for _ in range(n):
        w = rng.randint(cfg["min_size"] // g, cfg["max_size"] // g)
        h = rng.randint(cfg["min_size"] // g, cfg["max_size"] // g)
        x1 = rng.randint(0, top - w)
        y1 = rng.randint(0, top - h)
        objects.append({"desc": rng.choice(CLASSES), "bbox_2d": [x1 * g, y1 * g, (x1 + w) * g, (y1 + h) * g]})
    return objects


def scene_text(objects: list[dict]) -> str:
    """`cat <|coord_x1|><|coord_y1|><|coord_x2|><|coord_y2|>; dog ...` in the given order."""
    return "; ".join(o["desc"] + " " + "".join(COORD_TOKENS[v] for v in o["bbox_2d"]) for o in objects)


def make_record(rng: random.Random, rid: str, n: int, cfg: dict) -> dict:
    """One record: the answer order is render_answer's (sorted); the scene order is cfg['scene_order']."""
    objects = make_objects(rng, n, cfg)
    if cfg["scene_order"] == "sorted":
        scene_objects = sorted(
            objects, key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0], o["bbox_2d"][2], o["bbox_2d"][3], o["desc"])
        )
    else:
        scene_objects = list(objects)
        rng.shuffle(scene_objects)
    return {"id": rid, "scene": scene_text(scene_objects), "objects": objects}


def make_split(split: str, count: int, seed: int, cfg: dict) -> list[dict]:
    """`count` records with object counts cycling min..max (equal shares), ids `<split>-000001`..."""
    rng = random.Random(f"{seed}-{split}")
    lo, hi = cfg["min_objects"], cfg["max_objects"]
    return [make_record(rng, f"{split}-{i + 1:06d}", lo + i % (hi - lo + 1), cfg) for i in range(count)]


def build_data(out: Path, cfg: dict = DATA) -> None:
    (out / "data").mkdir(parents=True, exist_ok=True)
    dump_records(make_split("train", cfg["n_train"], cfg["seed"], cfg), out / "data" / "train.jsonl")
    dump_records(make_split("val", cfg["n_val"], cfg["seed"], cfg), out / "data" / "val.jsonl")


# ---- tokenizer ------------------------------------------------------------------------------------------
# Pre-tokenizer chunks: a word (optionally space-led), a run of punctuation whose pieces may be joined by
# single spaces (so `", "bbox_2d": ["` becomes `", "` + `bbox_2d` + `": ["`), or a whitespace run.
PRETOKEN_PATTERN = r" ?[A-Za-z0-9_]+| ?[^A-Za-z0-9_\s]+(?: [^A-Za-z0-9_\s]+)*|\s+"
BPE_VOCAB = 512  # includes the alphabet and the specials; the 1000 coord tokens come on top
_COORD_SPLIT = re.compile(r"<\|coord_\d+\|>")


def tokenizer_corpus(records: list[dict]) -> list[str]:
    """Full chat texts (system, user, assistant answer) of the records, coord tokens cut out as separators."""
    texts = []
    for rec in records:
        text = (
            "".join(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}\n" for m in render_messages(rec["scene"]))
            + "<|im_start|>assistant\n"
            + render_answer(rec["objects"])
            + IM_END
        )
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "\x00")
        texts.extend(p for chunk in _COORD_SPLIT.split(text) for p in chunk.split("\x00") if p)
    return texts


def build_tokenizer(out: Path, records: list[dict]) -> None:
    """Train the BPE on the records' chat texts and save it as a PreTrainedTokenizerFast."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the merge order must not depend on timing
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # tokens are literal text: decode == concatenation of token texts
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["\t", "\n", "\r"],  # other characters -> <unk>
    )
    tok.train_from_iterator(tokenizer_corpus(records), trainer=trainer)
    # Coordinate tokens are ordinary (non-special) added tokens: skip_special_tokens keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out / "tokenizer"))
    pin_tokenizer_class(out / "tokenizer")


# transformers 5.x forces `Qwen2Tokenizer` (a byte-level pipeline rebuilt from vocab + merges) on any folder
# whose config.json says model_type qwen2, ignoring tokenizer_class, so AutoTokenizer on stage1/ would
# tokenize wrongly. An auto_map entry skips that override: without trust_remote_code AutoTokenizer then
# honours tokenizer_class (TokenizersBackend); with it, it loads this do-nothing subclass. Both read
# tokenizer.json unchanged.
AUTO_MAP_MODULE = "tokenization_literal_bpe"
AUTO_MAP_SOURCE = '''"""Loads tokenizer.json unchanged (see assets/build_assets.py, pin_tokenizer_class)."""
from transformers import TokenizersBackend


class LiteralBPETokenizer(TokenizersBackend):
    """A literal-text BPE; exists only so AutoTokenizer does not swap in the byte-level Qwen2Tokenizer."""
'''


def pin_tokenizer_class(folder: Path) -> None:
    """Add the auto_map entry and its module so AutoTokenizer keeps tokenizer.json's pipeline."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoTokenizer": [None, f"{AUTO_MAP_MODULE}.LiteralBPETokenizer"]}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / f"{AUTO_MAP_MODULE}.py").write_text(AUTO_MAP_SOURCE, encoding="utf-8")


# ---- tiny model -----------------------------------------------------------------------------------------
MODEL = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,  # head_dim 32: vLLM's CPU attention accepts it
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "init_seed": 1234,
}


def build_model(out: Path) -> None:
    """Random-init Qwen2ForCausalLM from a fixed seed, sized to the saved tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from toolkit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    cfg = {k: v for k, v in MODEL.items() if k != "init_seed"}
    config = Qwen2Config(
        vocab_size=len(tok),
        head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
        use_cache=True,
        **cfg,
    )
    torch.manual_seed(MODEL["init_seed"])
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out / "tiny_qwen2"))


# ---- VLM: synthetic shapes on small canvases ---------------------------------------------------------------
VLM_DIR = "vlm"
SHAPES = ("circle", "square", "triangle")
COLOURS = ((220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 170, 20), (150, 60, 190), (20, 170, 190))
BACKGROUNDS = ((245, 245, 245), (230, 230, 220), (215, 225, 235))
VLM_DATA = {
    "seed": 20261124,
    "n_train": 1000,
    "n_val": 64,
    "size": 112,  # square canvas: 8 x 8 patches of 14 px -> 16 merged image tokens
    "min_objects": 1,
    "max_objects": 3,
    "grid": 7,  # box corners and sides are multiples of 7 px (half a patch): 17 values per axis
    "min_side": 21,  # shape side in pixels (each shape fills a square box)
    "max_side": 42,
    "gap": 2,  # pixels kept free between boxes, so every box shows its whole shape
}


def place_boxes(rng: random.Random, n: int, cfg: dict) -> list[tuple[int, int, int]]:
    """n non-overlapping (x0, y0, side) squares inside the canvas, by seeded rejection sampling."""
    boxes: list[tuple[int, int, int]] = []
    while len(boxes) < n:
        q = cfg["grid"]
        s = q * rng.randint(cfg["min_side"] // q, cfg["max_side"] // q)
        x, y = q * rng.randint(0, (cfg["size"] - s) // q), q * rng.randint(0, (cfg["size"] - s) // q)
        g = cfg["gap"]
        if all(x + s + g <= bx or bx + bs + g <= x or y + s + g <= by or by + bs + g <= y for bx, by, bs in boxes):
            boxes.append((x, y, s))
    return boxes


def draw_shape(draw, shape: str, x: int, y: int, s: int, colour) -> None:
    """Fill the square [x, x+s) x [y, y+s) with the shape; PIL's corner coordinates are inclusive."""
    x1, y1 = x + s - 1, y + s - 1
    if shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x, y, x1, y1), fill=colour)
    else:  # an upward triangle touching all four sides of its box
        draw.polygon(((x, y1), (x1, y1), ((x + x1) / 2, y)), fill=colour)


def make_vlm_sample(rng: random.Random, rid: str, n: int, cfg: dict):
    """(record dict, PIL image): n shapes; boxes as bins of the pixel box [x, y, x+s, y+s]; canonical order."""
    from PIL import Image, ImageDraw

    size = cfg["size"]
    image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    objects = []
    for x, y, s in place_boxes(rng, n, cfg):
        shape = rng.choice(SHAPES)
        draw_shape(draw, shape, x, y, s, rng.choice(COLOURS))
        objects.append({"desc": shape, "bbox_2d": [pixel_to_bin(v, size) for v in (x, y, x + s, y + s)]})
    record = {
        "id": rid,
        "images": [f"images/{rid}.png"],
        "width": size,
        "height": size,
        "objects": canonical_order(objects),
    }
    return record, image


def build_vlm_split(data_dir: Path, split: str, count: int, cfg: dict) -> None:
    """Images under data_dir/images/ and data_dir/<split>.jsonl; object counts cycle min..max."""
    rng = random.Random(f"{cfg['seed']}-{split}")
    lo, hi = cfg["min_objects"], cfg["max_objects"]
    records = []
    for i in range(count):
        record, image = make_vlm_sample(rng, f"{split}-{i + 1:06d}", lo + i % (hi - lo + 1), cfg)
        image.save(data_dir / record["images"][0], format="PNG", optimize=True)  # PIL writes no timestamp
        records.append(record)
    dump_records(records, data_dir / f"{split}.jsonl")


def build_vlm_data(out: Path, cfg: dict = VLM_DATA) -> None:
    data_dir = out / VLM_DIR / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)  # no stale images from an earlier, larger build
    (data_dir / "images").mkdir(parents=True)
    build_vlm_split(data_dir, "train", cfg["n_train"], cfg)
    build_vlm_split(data_dir, "val", cfg["n_val"], cfg)


# ---- VLM: tiny Qwen2-VL -------------------------------------------------------------------------------------
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")  # ids 1319..1322
VLM_MODEL = {
    # head_dim 32 (= hidden / heads): vLLM's CPU attention rejects 16; mrope_section sums to head_dim / 2
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6], "rope_type": "default"},
    },
    "vision": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    },
    # 112 x 112 stays 112 x 112 (a multiple of patch 14 x merge 2): 64 patches, 16 image tokens
    "processor": {
        "min_pixels": 56 * 56,
        "max_pixels": 112 * 112,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
    },
    "init_seed": 4321,
}
VLM_MODEL_DIR = "tiny_qwen2_vl"
PROCESSOR_MODULE = "processing_image_only"  # toolkit/vlm/processing_image_only.py, shipped as remote code


def vlm_tokenizer(out: Path):
    """The literal tokenizer (out/tokenizer) plus the four vision tokens (special, ids 1319..1322)."""
    from toolkit.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    return tok


def vlm_config(tok):
    from transformers import Qwen2VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    specials = {
        "bos_token_id": tok.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    text = dict(VLM_MODEL["text"], vocab_size=len(tok), tie_word_embeddings=False, **specials)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=dict(VLM_MODEL["vision"]),
        tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **specials,
    )


def save_vlm_processor(folder: Path, tok) -> None:
    """Image-only processor (no torchvision anywhere) + tokenizer files, loadable by AutoProcessor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.vlm.processing_image_only import ImageOnlyQwen2VLProcessor

    ip = Qwen2VLImageProcessorPil(**VLM_MODEL["processor"])
    proc = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    proc.save_pretrained(str(folder))
    shutil.copyfile(HERE.parent / "toolkit" / "vlm" / f"{PROCESSOR_MODULE}.py", folder / f"{PROCESSOR_MODULE}.py")
    cfg_path = folder / "processor_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoProcessor": f"{PROCESSOR_MODULE}.ImageOnlyQwen2VLProcessor"}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pin_tokenizer_class(folder)  # config.json says qwen2_vl: keep AutoTokenizer off the byte-level Qwen2Tokenizer


def build_vlm_model(out: Path) -> None:
    """Random-init Qwen2VLForConditionalGeneration (fixed seed, fp32, untied) + processor + tokenizer."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    tok = vlm_tokenizer(out)
    torch.manual_seed(VLM_MODEL["init_seed"])
    model = Qwen2VLForConditionalGeneration(vlm_config(tok)).float()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    folder = out / VLM_DIR / VLM_MODEL_DIR
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder))
    save_vlm_processor(folder, tok)


# ---- VLM: Stage-1 warm-up ----------------------------------------------------------------------------------
# Plain teacher forcing so greedy rollouts are mostly valid JSON (Stage-2 then has something to fix).
# Same scaffolding as stage1.py (lr schedule, parse/score), but images go through the processor.
VLM_STAGE1 = {
    "seed": 11,
    "steps": 2000,
    "batch_size": 16,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "betas": (0.9, 0.98),
    "grad_clip": 1.0,
    "eval_every": 250,
    "eval_batch": 32,
}
VLM_STAGE1_DIR = "stage1"


def vlm_messages() -> list[dict]:
    """System prompt + user turn with one collapsed image placeholder (the processor expands the pad)."""
    from toolkit.vlm.images import IMAGE_PLACEHOLDER

    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": IMAGE_PLACEHOLDER + USER_INSTRUCTION},
    ]


def vlm_processor(tok):
    """The image-only processor built in process (no remote-code import needed for training)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from toolkit.vlm.processing_image_only import ImageOnlyQwen2VLProcessor

    return ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**VLM_MODEL["processor"]),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )


def encode_vlm_prompt(proc, tok, rec) -> dict:
    """Expanded prompt ids (one pad per merged patch), pixel_values and image_grid_thw of one record."""
    from toolkit.vlm.images import open_image

    text = tok.apply_chat_template(vlm_messages(), tokenize=False, add_generation_prompt=True)
    enc = proc(text=[text], images=[open_image(rec.images[0])], return_tensors="pt")
    # mm_token_type_ids (1 on image pads) is what Qwen2-VL's M-RoPE positions are computed from
    return {
        "ids": enc["input_ids"][0].tolist(),
        "pixel_values": enc["pixel_values"],
        "grid": enc["image_grid_thw"],
        "image_token_id": proc.image_token_id,
    }


def encode_vlm_split(proc, tok, records) -> list[dict]:
    """Prompt encoding + teacher answer ids (answer + <|im_end|>) per record."""
    from toolkit.data.tokenizer import encode_answer, im_end_id

    out = []
    for rec in records:
        sample = encode_vlm_prompt(proc, tok, rec)
        sample["answer"] = encode_answer(tok, render_answer(rec.objects)) + [im_end_id(tok)]
        out.append(sample)
    return out


def vlm_train_batch(samples, pad_id: int) -> dict:
    """Right-padded ids / mask / labels (labels on the answer only) + the images of the batch."""
    import torch

    seqs = [s["ids"] + s["answer"] for s in samples]
    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (s, seq) in enumerate(zip(samples, seqs)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, len(s["ids"]) : len(seq)] = torch.tensor(s["answer"])
    image_id = samples[0]["image_token_id"]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "mm_token_type_ids": (ids == image_id).long(),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["grid"] for s in samples]),
    }


def vlm_greedy_answers(model, tok, samples, batch: int, max_new_tokens: int) -> list[str | None]:
    """Greedy rollouts (left-padded prompts); the text before <|im_end|>, or None when it never ended."""
    import torch

    end = tok.eos_token_id
    texts: list[str | None] = []
    model.eval()
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        enc = tok.pad({"input_ids": [s["ids"] for s in chunk]}, padding=True, return_tensors="pt")
        types = (enc["input_ids"] == chunk[0]["image_token_id"]).long()
        with torch.no_grad():
            out = model.generate(
                **enc,
                mm_token_type_ids=types,
                pixel_values=torch.cat([s["pixel_values"] for s in chunk]),
                image_grid_thw=torch.cat([s["grid"] for s in chunk]),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=end,
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            texts.append(tok.decode(row[: row.index(end)], skip_special_tokens=False) if end in row else None)
    model.train()
    return texts


def vlm_evaluate(model, tok, samples, records, batch: int) -> dict:
    """Valid-parse rate and object F1 (stage1.score: same class, IoU >= 0.5, Hungarian) of greedy rollouts."""
    from stage1 import parse_answer, score

    longest = max(len(s["answer"]) for s in samples)
    texts = vlm_greedy_answers(model, tok, samples, batch, longest + 16)
    preds = [parse_answer(t) if t is not None else None for t in texts]
    return score(preds, [list(r.objects) for r in records])


def vlm_optimizer(model, cfg: dict):
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=tuple(cfg["betas"]),
    )


def train_vlm(model, tok, train, val, val_records, cfg: dict, log) -> list[dict]:
    """Teacher-force for cfg['steps'] steps on uniformly sampled train records; eval rows as the curve."""
    import torch
    from stage1 import lr_at

    torch.manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    opt = vlm_optimizer(model, cfg)
    model.train()
    curve, losses, t0 = [], [], time.time()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = vlm_train_batch([train[rng.randrange(len(train))] for _ in range(cfg["batch_size"])], tok.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done % cfg["eval_every"] == 0 or done == cfg["steps"]:
            metrics = vlm_evaluate(model, tok, val, val_records, cfg["eval_batch"])
            row = {
                "step": done,
                "loss": round(sum(losses) / len(losses), 4),
                **{k: round(v, 4) for k, v in metrics.items()},
            }
            curve.append(row)
            log({**row, "elapsed_s": round(time.time() - t0, 1)})
            losses = []
    return curve


def build_vlm_stage1(out: Path, steps: int | None = None) -> dict:
    """Train from vlm/tiny_qwen2_vl on vlm/data; save model + the init folder's other files + curve to vlm/stage1."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from toolkit.data.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = dict(VLM_STAGE1, **({"steps": steps} if steps is not None else {}))
    init = out / VLM_DIR / VLM_MODEL_DIR
    tok = load_tokenizer(init)
    proc = vlm_processor(tok)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(init), dtype=torch.float32)
    train_records = load_records(out / VLM_DIR / "data" / "train.jsonl")
    val_records = load_records(out / VLM_DIR / "data" / "val.jsonl")
    train, val = encode_vlm_split(proc, tok, train_records), encode_vlm_split(proc, tok, val_records)
    curve = train_vlm(
        model, tok, train, val, val_records, cfg, lambda row: print(json.dumps(row), file=sys.stderr, flush=True)
    )
    return save_vlm_stage1(model, init, out / VLM_DIR / VLM_STAGE1_DIR, curve)


def save_vlm_stage1(model, init: Path, dest: Path, curve: list[dict]) -> dict:
    """The trained model, the init folder's other files (processor, tokenizer, remote code: byte copies) and
    the curve into `dest`; returns the last curve row."""
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(str(dest))
    for src in sorted(init.iterdir()):
        if not (dest / src.name).exists():
            shutil.copyfile(src, dest / src.name)
    with (dest / "training_curve.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
        for row in curve:
            fh.write(json.dumps(row) + "\n")
    return curve[-1]


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma list of parts out of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: assets/)")
    p.add_argument("--stage1-steps", type=int, default=None, help="override the Stage-1 step count (smoke builds)")
    p.add_argument(
        "--vlm-stage1-steps", type=int, default=None, help="override the step count of every VLM Stage-1 (smoke builds)"
    )
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS + OPT_IN_PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    return args


# What each part reads from --out, written by an earlier part: checked before anything is built.
NEEDS = {
    "model": ("tokenizer",),
    "stage1": ("tokenizer", "data", "model"),
    "vlm_model": ("tokenizer",),
    "vlm_stage1": ("tokenizer", "vlm_data", "vlm_model"),
}
MADE = {
    "tokenizer": "tokenizer/tokenizer.json",
    "data": "data/train.jsonl",
    "model": "tiny_qwen2/config.json",
    "vlm_data": "vlm/data/train.jsonl",
    "vlm_model": "vlm/tiny_qwen2_vl/config.json",
}


def missing_parts(parts: list[str], out: Path) -> list[str]:
    """'part needs X' for every dependency neither built in this call nor already under out."""
    return [
        f"{part} needs the {need} part first ({out / MADE[need]} is missing)"
        for part in parts
        for need in NEEDS.get(part, ())
        if need not in parts and not (out / MADE[need]).exists()
    ]


def _wanted(part: str, parts) -> bool:
    return part in parts or any(part in NEEDS.get(q, ()) for q in parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_parts(args.parts, args.out.resolve())
    if missing:
        sys.exit(
            "; ".join(missing)
            + f" (fix: add them to --only, e.g. --only {','.join(p for p in PARTS if _wanted(p, args.parts))})"
        )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if "data" in args.parts:
        build_data(out)
    if "tokenizer" in args.parts:
        build_tokenizer(out, make_split("train", DATA["n_train"], DATA["seed"], DATA))
    if "model" in args.parts:
        build_model(out)
    if "stage1" in args.parts:
        from stage1 import build_stage1  # assets/stage1.py, beside this script

        build_stage1(out, steps=args.stage1_steps)
    if "vlm_data" in args.parts:
        build_vlm_data(out)
    if "vlm_model" in args.parts:
        build_vlm_model(out)
    if "vlm_stage1" in args.parts:
        build_vlm_stage1(out, steps=args.vlm_stage1_steps)
    for family in ("qwen2_5_vl", "qwen3_vl"):  # assets/vlm_families.py: Qwen2.5-VL and Qwen3-VL
        if f"{family}_model" in args.parts or f"{family}_stage1" in args.parts:
            import vlm_families
        if f"{family}_model" in args.parts:
            vlm_families.build_family_model(out, family)
        if f"{family}_stage1" in args.parts:
            vlm_families.build_family_stage1(out, family, steps=args.vlm_stage1_steps)
    if "lvis_synth" in args.parts:  # LVIS-shaped scenes: 40-60 objects, 1-2k-token answers (docs/DATA.md)
        from toolkit.data.synth_lvis import main as synth_lvis_main

        synth_lvis_main([str(out / "lvis_synth")])
    print(f"built {','.join(args.parts)} into {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
