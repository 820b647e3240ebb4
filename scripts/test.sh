#!/usr/bin/env bash
# The test command (README, .ci/run): set up .venv, make the real engines the tests start available
# (a single-node SLURM for tests/launch/test_slurm.py; skipped politely without root/apt), run ruff, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The optional Weights & Biases sink is tested too (offline; tests/e2e/test_wandb.py).
.venv/bin/pip install -q -e '.[wandb]'
bash scripts/install_slurm.sh || echo "test: SLURM install failed; the slurm-marked tests will skip with a reason" >&2
# Lint and format check (pyproject.toml [tool.ruff]) before the tests: any finding fails the test command.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
