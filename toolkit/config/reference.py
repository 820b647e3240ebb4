"""Generate docs/CONFIG_REFERENCE.md from the schema, the rules, the leaf rules and the legacy table.

    python -m toolkit.config.reference > docs/CONFIG_REFERENCE.md     # regenerate
    python -m toolkit.config.reference --check docs/CONFIG_REFERENCE.md  # exit 1 when stale

Key descriptions live next to the schema (toolkit/config/schema.py); this module only renders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from toolkit.config.dsconfig import INJECTED_KEYS, ds_config_names
from toolkit.config.leaf import CANONICAL_PARENT, PINNED, PINNED_WHEN_VLLM
from toolkit.config.legacy import LEGACY
from toolkit.config.normalize import DERIVED_DOCS
from toolkit.config.rules import all_rules
from toolkit.config.schema import ROOT
from toolkit.config.settings import SETTINGS_DOCS
from toolkit.config.spec import REQUIRED, ItemList, Key, Section
from toolkit.config.yamlio import MAX_NESTING, MAX_NODES, render_path

HEADER = """# Config reference

<!-- GENERATED from toolkit/config/schema.py by `python -m toolkit.config.reference > docs/CONFIG_REFERENCE.md`.
     Do not edit by hand: tests/config/test_reference.py fails when this file is stale. -->

A profile is YAML with the sections below. `stage2 config --profile NAME` prints the resolved result,
`stage2-lint-profiles configs/` checks every canonical profile.

## Load pipeline

1. YAML safe load with positions. Duplicate keys, tags and merge keys (`<<`) are errors. Scalars follow
   the YAML 1.2 core schema, fixing two PyYAML (YAML 1.1) warts: `1e-5` is a float (PyYAML reads it as a
   string), and only `true`/`false` are booleans (`eval_strategy: no` stays the string "no"). Numbers in
   quotes are strings and fail where a number is expected: there is no coercion.
   Limits, checked before anything is expanded: a file must be UTF-8 (else one error at the first bad
   byte's line and column); it may stand for at most {max_nodes:,} values once YAML aliases are expanded
   (anchors and aliases work, but nested aliases that multiply, an "alias bomb", are refused at the
   anchor's line) and nest at most {max_nesting} levels; an alias inside its own anchor is an error.
2. `extends: <one relative path>`: the parent is loaded first, then this file is deep-merged on top
   (mappings merge key by key; lists and scalars replace). Cycles, missing parents and lists of parents
   are errors.
3. `--set KEY=VALUE` overrides (VALUE is YAML with the same rules and limits; `a.b[0].c` paths work) are
   merged on top; their location is `--set`.
4. Legacy keys (table below) fail with a migration message naming the replacement, before the schema,
   so the tailored message always wins over "unknown key". No alias fallback, no dual read.
5. The strict schema: unknown keys fail at every depth (with a did-you-mean), types are checked,
   defaults are filled.
6. Cross-field rules (below). They run only when the schema passes; otherwise the run says how many were skipped.
7. Canonical leaf rules for `configs/stage2_ab/{prod,smoke}/*.yaml` (below).
8. Normalization: paths made absolute, derived values, typed settings; the result is a frozen
   `ResolvedConfig`.

Every error names `file:line:col`, the dotted key path (with list indices) and a fix; all errors of a
run are reported together. A missing required key is reported in the file being loaded (at the nearest
section that file writes, else at its `extends:` line), never in the parent that happens to hold the
section: parents are bases, not complete profiles.

## Profiles

- Names: `prod/ab_mixed` → `<project>/configs/stage2_ab/prod/ab_mixed.yaml` (looked up under the current
  directory, then under the toolkit checkout); a path to a `.yaml` file also works.
- Tree: `configs/base.yaml` (global defaults) ← `configs/stage2_ab/base.yaml` (Stage-2 defaults) ← the
  canonical leaves `configs/stage2_ab/{prod,smoke}/{a_only,b_only,ab_mixed}.yaml`.
- Discovery is exactly `configs/stage2_ab/{prod,smoke}/*.yaml`; any other YAML under `configs/stage2_ab/`
  is reported by the linter, never used by name.

## Paths

Relative paths in `data.train_jsonl`, `data.val_jsonl`, `data.image_root`, `training.output_dir`,
`training.logging_dir` and `model.model` resolve against the **project root of the file that wrote the
value**: the parent of the `configs/` directory that holds that file (for a file outside any `configs/`
directory, the file's own directory). So a profile kept elsewhere that extends a canonical one (by an
absolute or relative `extends:`) keeps the parent's `model.model: assets/stage1` pointing into the
toolkit checkout, while the paths it writes itself resolve next to it. `model.model` is treated as a
path only when it starts with `.`, `/` or `~`, or contains `/` and exists under that project root;
otherwise it is a hub id and kept as written. Values given with `--set` resolve against the current
directory; a schema default against the loaded profile's project root. The resolved config shows
absolute paths.
"""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(key: Key) -> str:
    if key.default is REQUIRED:
        return "**required**"
    return f"`{json.dumps(key.default)}`"


def _dotted(parts: tuple) -> str:
    return ".".join(parts)  # item lists appear as one part `servers[]`


def _section_tables(section: Section, prefix: tuple = ()) -> list[str]:
    name = _dotted(prefix)
    lines = [
        f"### `{name}`" if prefix else "### Top level",
        "",
        section.doc,
        "",
        "| key | type | default | constraint | description |",
        "|---|---|---|---|---|",
    ]
    nested = []
    for key, spec in section.keys.items():
        full = _dotted(prefix + (key,))
        if isinstance(spec, Key):
            lines.append(
                f"| `{full}` | {_cell(spec.atom.type_text)} | {_cell(_default(spec))} | "
                f"{_cell(spec.atom.constraint)} | {_cell(spec.doc)} |"
            )
        elif isinstance(spec, Section):
            req = "**required**" if spec.required else "`{}`"
            lines.append(f"| `{full}` | mapping | {req} | see below | {_cell(spec.doc)} |")
            nested.append((prefix + (key,), spec))
        elif isinstance(spec, ItemList):
            lines.append(
                f"| `{full}` | list of mappings | `{json.dumps(list(spec.default))}` | see below | {_cell(spec.doc)} |"
            )
            nested.append((prefix + (key + "[]",), spec.item))
    lines.append("")
    for sub_prefix, sub in nested:
        lines += _section_tables(sub, sub_prefix)
    return lines


def _rules() -> list[str]:
    lines = [
        "## Cross-field rules",
        "",
        "`rollout_backend` and `vllm.mode` dispatch to their own rules (hf: none; vllm: max_model_len, "
        "sync mode, then colocate: none / server: the server list).",
        "",
    ]
    lines += [f"- `{r.__name__}`: {(r.__doc__ or '').strip()}" for r in all_rules()]
    return lines + [""]


def _leaf_rules() -> list[str]:
    keys = ", ".join(f"`{render_path(p)}`" for p in PINNED)
    return [
        "## Canonical leaf rules",
        "",
        "Checked on the raw leaf (before merging) of `configs/stage2_ab/{prod,smoke}/*.yaml` only:",
        "",
        f"- `extends` is exactly `{CANONICAL_PARENT}` (one parent; other overrides are inlined).",
        f"- The leaf itself sets: {keys}; plus `{render_path(PINNED_WHEN_VLLM[0])}` when its "
        f"`rollout_matching.rollout_backend` is `vllm`. Missing keys are listed in one error.",
        "- A leaf that repeats its parent's value for a key it need not pin gets a warning.",
        "",
    ]


def _derived_and_settings() -> list[str]:
    lines = [
        "## Derived values",
        "",
        "One function (`toolkit.config.derive`) used by `stage2 config`, preflight and the trainer; "
        "`cfg.derived.<name>`. E = training.effective_batch_size, P = per_device_train_batch_size, "
        "W = learner world size.",
        "",
    ]
    lines += [f"- `{name}`: {doc}" for name, doc in DERIVED_DOCS.items()]
    lines += [
        "",
        "## Typed settings",
        "",
        "`cfg.settings` (toolkit/config/settings.py): the runtime knobs as frozen dataclasses, built once per "
        "resolved config and read by the trainer, the backends, the rollout server and preflight, which never "
        "re-derive a value or repeat a default. `stage2 config --settings` prints them:",
        "",
    ]
    lines += [f"- `{name}`: {doc}" for name, doc in SETTINGS_DOCS.items()]
    lines += [""]
    return lines


def _ds_and_legacy() -> list[str]:
    lines = [
        "## DeepSpeed configs",
        "",
        f"`deepspeed.config` names a file in `ds_configs/`: {', '.join(f'`{n}`' for n in ds_config_names())}. "
        "They hold engine settings only; the trainer injects "
        f"{', '.join(f'`{k}`' for k in INJECTED_KEYS)} from the profile (micro batch = "
        "per_device_train_batch_size, `gradient_accumulation_steps: 1` because the trainer owns accumulation, "
        "`bf16` from model.torch_dtype, `gradient_clipping` from training.max_grad_norm), so the JSON files "
        "must not set them (`toolkit.config.load_ds_config` refuses them).",
        "",
        "## Legacy keys",
        "",
        "These keys fail with their own message. `X.*` relocates every sub-key to the same sub-key under the new path.",
        "",
        "| legacy path | what happened | fix |",
        "|---|---|---|",
    ]
    lines += [f"| `{path}` | {_cell(entry.message)} | {_cell(entry.fix)} |" for path, entry in LEGACY.items()]
    return lines + [""]


def render_reference() -> str:
    """The full text of docs/CONFIG_REFERENCE.md."""
    header = HEADER.replace("{max_nodes:,}", f"{MAX_NODES:,}").replace("{max_nesting}", str(MAX_NESTING))
    parts = [header, "## Sections", ""] + _section_tables(ROOT) + _rules() + _leaf_rules()
    parts += _derived_and_settings() + _ds_and_legacy()
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render_reference()
    if argv[:1] == ["--check"] and len(argv) == 2:
        current = Path(argv[1]).read_text(encoding="utf-8") if Path(argv[1]).is_file() else ""
        if current != text:
            print(f"{argv[1]} is stale; run: python -m toolkit.config.reference > {argv[1]}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
