"""`stage2 data`: convert COCO/LVIS annotations to records, check a records file (docs/DATA.md).

Registered lazily in launchers/cli.py; imports only click and toolkit/cli_options.py here (the library is
imported inside the command bodies, as the rest of the CLI). Reports go to stdout, progress and summaries to stderr.
"""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli_options import profile_options


@click.group("data")
def data() -> None:
    """Prepare and check records files (COCO/LVIS conversion, dataset check).

    \b
    Examples:
      stage2 data convert --coco lvis_v1_train.json --images coco/train2017 --out lvis/train.jsonl --max-side 1024
      stage2 data check lvis/train.jsonl --profile prod/ab_mixed
    """


@data.command("convert")
@click.option(
    "--coco",
    "annotations",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO or LVIS detection annotations (instances_*.json, lvis_v1_*.json).",
)
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder holding the images named by file_name (COCO) or the coco_url basename (LVIS).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output records JSONL.")
@click.option(
    "--max-objects",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Skip images with more objects than this (never cut: see docs/DATA.md).",
)
@click.option(
    "--max-side",
    type=click.IntRange(min=1),
    default=None,
    help="Resize so the long side is at most this many pixels, on the patch grid; images go to OUT's folder/images/.",
)
@click.option(
    "--grid",
    type=click.IntRange(min=1),
    default=None,
    help="Patch grid in pixels (patch_size x merge_size) for --max-side; default 32 (Qwen3-VL), 28 for Qwen2-VL.",
)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Read the patch grid from this Qwen-VL folder's processor config instead of --grid.",
)
@click.option(
    "--iscrowd",
    type=click.Choice(["drop", "keep"]),
    default="drop",
    show_default=True,
    help="What to do with crowd boxes (iscrowd: 1).",
)
@click.option("--keep-empty", is_flag=True, help="Keep images without objects (skipped by default).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def convert(
    annotations, images_dir, out, max_objects, max_side, grid, model_dir, iscrowd, keep_empty, progress
) -> None:
    """Convert COCO/LVIS annotations to image records (bbox_2d bins, category names as desc).

    \b
    Examples:
      stage2 data convert --coco instances_val2017.json --images val2017 --out coco/val.jsonl
      stage2 data convert --coco lvis_v1_train.json --images train2017 --out lvis/train.jsonl \\
        --max-side 1024 --model /models/stage1
    """
    from toolkit.data.convert import DEFAULT_GRID, ConvertError, convert_coco, model_grid

    try:
        grid = model_grid(model_dir) if model_dir else (grid or DEFAULT_GRID)
        summary = convert_coco(
            annotations,
            images_dir,
            out,
            max_objects=max_objects,
            max_side=max_side,
            grid=grid,
            iscrowd=iscrowd,
            keep_empty=keep_empty,
            progress=progress,
        )
    except ConvertError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join([f"wrote {out}", *summary.lines()]), err=True)


@data.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@profile_options(
    required=False,
    set_help="Override a profile key (with --profile).",
    profile_help="Also count answer tokens against this profile's max_new_tokens and global_max_length "
    "(its data.image_root, bbox_format and poly_policy apply).",
)
@click.option("--image-root", default=None, help="Root for relative image entries (default: the file's folder).")
@click.option("--bbox-format", type=click.Choice(["norm1000", "pixel"]), default="norm1000", show_default=True)
@click.option("--poly-policy", type=click.Choice(["error", "drop"]), default="error", show_default=True)
@click.option(
    "--decode", is_flag=True, help="Decode every image in full (slow; finds damage the load-time checks miss)."
)
def check(path, profile, sets, image_root, bbox_format, poly_policy, decode) -> None:
    """Check a records file: every problem (file:line) at once, then statistics. Exit 1 on any problem.

    \b
    Examples:
      stage2 data check data/train.jsonl
      stage2 data check /data/lvis/bbox_max60/train.coord.jsonl --profile prod/ab_mixed
    """
    from toolkit.config import ConfigError, load_profile
    from toolkit.data.check import check_dataset
    from toolkit.data.records import RecordError

    try:
        cfg = load_profile(profile, sets, world_size=1) if profile else None
        report = check_dataset(
            str(path), cfg=cfg, image_root=image_root, bbox_format=bbox_format, poly_policy=poly_policy, decode=decode
        )
    except (ConfigError, RecordError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(report.lines()))
    if not report.ok:
        click.get_current_context().exit(1)
