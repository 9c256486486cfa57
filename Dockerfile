# syntax=docker/dockerfile:1.7
# GPU image for elastic-megatron: training, slicing and evaluation on CUDA nodes.
#
#   docker build -t elastic-megatron:dev .
#   docker run --gpus all --rm -it --ipc=host elastic-megatron:dev \
#       launch/torchrun.sh -- train parallel.tensor=2
#   enroot import dockerd://elastic-megatron:dev   # -> .sqsh for slurm/train.sbatch (CONTAINER_IMAGE)
#
# NOT BUILT IN CI: the machine this project is developed on has no docker engine (and no GPU), so
# this file has never been built there. tests/unit/test_launch.py only checks its pins against
# pyproject.toml. Build and smoke-test it on a GPU host before relying on it.
#
# Base: NGC PyTorch, pinned by tag. It ships a CUDA build of torch (NVIDIA's own build, not the
# PyPI torch==2.13.0 that pyproject.toml pins for CPU), Transformer Engine, NCCL, cuDNN, nvcc
# and the build tools that mamba-ssm / causal-conv1d need. megatron-core needs no apex: without it
# it falls back to torch implementations, and elastic_megatron.compat has pure-PyTorch fallbacks
# for the Mamba kernels, so the image works whatever optional pieces the base carries.
# Check exact versions with `pip list` inside the image; the base also pins its own packages in
# /etc/pip/constraint.txt (NGC >= 25.03).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

# GPU architectures to compile the Mamba kernels for (8.0 A100, 9.0 H100/H200, 10.0 B200).
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ARG MAX_JOBS=8
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /workspace/elastic-megatron

# 1. Keep the base image's GPU stack: a constraints file with the exact installed versions of
#    torch and friends. PIP_CONSTRAINT makes every later pip call (ours and the user's) use it, so
#    nothing reinstalls or upgrades torch. It replaces the base's blanket /etc/pip/constraint.txt,
#    which pins every preinstalled package and would clash with our exact pins below.
RUN python - <<'EOF' > /opt/keep-base.txt && cat /opt/keep-base.txt
import importlib.metadata as md
for name in ("torch", "triton", "pytorch-triton", "transformer-engine", "transformer-engine-torch",
             "flash-attn"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
ENV PIP_CONSTRAINT=/opt/keep-base.txt

# 2. Python dependencies from pyproject.toml, except torch (the base's stays). Pins: megatron-core
#    0.16.1 (the version our CPU shims target), omegaconf, einops, wandb, ...
COPY pyproject.toml ./
RUN python - <<'EOF' > /tmp/requirements.txt && cat /tmp/requirements.txt
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() != "torch"))
EOF
RUN grep -qx 'megatron-core==0.16.1' /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# 3. Mamba-2 GPU kernels, compiled here against the base's torch (prebuilt wheels target PyPI
#    torch builds and do not load against NGC's). --no-build-isolation: build with that torch.
RUN CAUSAL_CONV1D_FORCE_BUILD=TRUE pip install --no-build-isolation causal-conv1d==1.7.0 \
 && MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation mamba-ssm==2.3.2.post1

# 4. The project itself, editable, no dependency resolution (everything is installed above).
COPY . .
RUN pip install --no-deps -e . \
 && python -c "import torch, megatron.core, elastic_megatron; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', megatron.core.__version__)"

CMD ["bash"]
