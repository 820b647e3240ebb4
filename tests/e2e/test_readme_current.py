"""README.md is current: every command it shows parses with today's CLI and its profile/--set values
resolve, and every demo figure it quotes is the one in docs/readme_figures.json, which
`scripts/readme_figures.py` regenerates from the pinned runs (run it after a change to the training math,
then copy the figures it prints into the README)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FIGURES = json.loads((ROOT / "docs" / "readme_figures.json").read_text())
TOOLS = ("stage2", "stage2-launch", "stage2-lint-profiles", "torchrun", "python", "bash", "sbatch", "tensorboard")


def readme_commands() -> list[str]:
    """Lines of ```bash blocks, and inline `code` spans (they may wrap lines) that start with a tool."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # a command continued with a trailing backslash is one line
        found += [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.split(" ")[0].removeprefix(".venv/bin/") in TOOLS and len(span.split()) > 2:
            found.append(span)
    return found


def _cli(tool: str) -> click.Command:
    from launchers.cli import lint_profiles, main
    from launchers.launch_cmd import launch
    from toolkit.train import train_command

    return {
        "stage2": main,
        "stage2-launch": launch,
        "stage2-lint-profiles": lint_profiles,
        "toolkit.train": train_command,
    }[tool]


def _parse(tool: str, args: list[str]) -> click.Context:
    """Parse like the real command line would, without running it (usage errors raise)."""
    cmd = _cli(tool)
    name = tool
    while isinstance(cmd, click.Group):  # `stage2 data convert …`: descend through nested groups
        with cmd.make_context(name, list(args), resilient_parsing=True) as group_ctx:
            sub = cmd.get_command(group_ctx, args[0])
        assert sub is not None, f"no subcommand {args[0]!r}"
        cmd, name, args = sub, args[0], args[1:]
    return cmd.make_context(name, list(args))


def _world(params: dict, argv: list[str]) -> int:
    if "--nproc_per_node" in argv:
        return int(argv[argv.index("--nproc_per_node") + 1])
    gpus = params.get("gpus")
    if gpus and gpus != "cpu":
        return len(gpus.split(","))
    return params.get("nproc") or 1


def check_command(line: str) -> None:
    from toolkit.config import load_profile

    for part in re.split(r"&&|\|", line):
        argv = shlex.split(part, comments=True)
        if not argv:
            continue
        tool = argv[0].removeprefix(".venv/bin/")
        if tool in ("bash", "sbatch"):
            assert (ROOT / argv[1]).is_file(), f"{line}: no file {argv[1]}"
            if tool == "sbatch":
                load_profile(argv[2])
            continue
        if tool in ("tensorboard", "jq"):
            continue
        if tool in ("torchrun", "python") and "toolkit.train" not in argv:
            module = argv[argv.index("-m") + 1]  # e.g. python -m toolkit.data.synth_lvis OUT
            assert importlib.util.find_spec(module) is not None, f"{line}: no module {module}"
            continue
        if tool in ("torchrun", "python"):
            ctx = _parse("toolkit.train", argv[argv.index("toolkit.train") + 1 :])
        else:
            try:
                ctx = _parse(tool, argv[1:])
            except click.MissingParameter:
                if any(a.startswith("-") for a in argv):
                    raise
                continue  # prose naming a command (`stage2 data check`), not an invocation
            except click.BadParameter as err:
                if "does not exist" not in str(err):
                    raise
                continue  # an example path of the user's (`--coco lvis_v1_train.json`): the options parsed

        params = ctx.params
        if params.get("profile"):
            sets = params.get("sets") or params.get("overrides") or ()
            load_profile(params["profile"], sets, world_size=_world(params, argv))


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_parses_and_its_profile_resolves(line, monkeypatch):
    monkeypatch.chdir(ROOT)
    check_command(line)


def test_the_command_check_catches_a_stale_option_or_key(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(click.UsageError):
        check_command("stage2 train --profile smoke/ab_mixed --no-such-flag")
    from toolkit.config import ConfigError

    with pytest.raises(ConfigError):
        check_command("stage2 train -p smoke/ab_mixed --set training.max_stepz=4")
    assert len(readme_commands()) >= 15


def _arrow(values, fmt: str) -> str:
    return " → ".join(format(v, fmt) for v in values)


def expected_figures() -> list[str]:
    demo, b = FIGURES["demo"], FIGURES["b_only"]
    steps = demo["eval_steps"]
    return [
        f"({demo['first_b_rollout_f1']:.2f} on its 8 samples)",
        f"F1 {_arrow(demo['eval_f1'], '.3f')} at steps {steps[0]}…{steps[-1]}",
        f"(class-aware F1@0.5: {_arrow(demo['class50_f1'], '.2f')})",
        f"valid JSON {demo['valid_json'][0]:.2f}–{demo['valid_json'][1]:.2f}",
        f"valid-JSON drop {demo['valid_json_drop']:.3f} < 0.05",
        f"valid JSON falls {_arrow(b['valid_json'], '.2f')}",
        f"GT rise {_arrow(b['pred_per_gt'], '.2f')}",
        f"(precision {_arrow(b['precision'], '.2f')})",
    ]


@pytest.mark.parametrize("figure", expected_figures())
def test_every_readme_figure_is_the_measured_one(figure):
    text = " ".join(README.split())
    assert figure in text, (
        f"README.md does not say {figure!r}; the figures in docs/readme_figures.json come from "
        "`python scripts/readme_figures.py` (rerun it after changing the training math)"
    )
