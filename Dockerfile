# The ray-detect image: Ray 2.60.0 on Python 3.11 with CUDA 13.0, torch built for the same CUDA 13.0, the
# app, and torchvision's pretrained FasterRCNN weights, so pods start and detect without network access.
# What GPU nodes need follows from CUDA 13.0 (its driver floor, and the GPUs it still supports): stated
# once, as app.device.IMAGE_REQUIREMENTS, and explained in docs/kubernetes.md ("GPU requirements").
#
#   docker build -t ghcr.io/ray-detect/ray-detect:0.1.0 .
#   docker build --build-arg BAKE_WEIGHTS=false -t ray-detect:no-weights .
#
# No ENTRYPOINT or CMD of our own: KubeRay starts the Ray processes in every pod, and a RayJob's
# entrypoint (`python -m app ...`) runs the app. The Ray version follows pyproject.toml's pin, the Python
# version (3.11) lies in its requires-python, and the tag follows its version; tests/test_dockerfile.py
# fails when they drift. The image gets the package alone: no test code (tests/ stays out, .dockerignore).
FROM rayproject/ray:2.60.0-py311-cu130

LABEL org.opencontainers.image.title="ray-detect" \
      org.opencontainers.image.description="Object-detection batch inference with Ray Data and torchvision FasterRCNN" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/ray-detect/ray-detect" \
      org.opencontainers.image.licenses="Apache-2.0"

# The base image's non-root user, ray (uid 1000) in group users (gid 100): the chart runs every pod as
# 1000:100, and the numeric form lets the kubelet verify runAsNonRoot. Ray's Python lives in
# /home/ray/anaconda3, owned by this user, so pip needs no root. The source goes to ray-detect/, which
# COPY --chown creates owned by ray (pip builds in the source tree).
USER 1000:100
WORKDIR /home/ray
# Every torch.load in the image reads tensors only, never pickled code: torchvision's own loading of its
# pretrained weights included (it asks for weights_only=False).
ENV TORCH_HOME=/home/ray/.cache/torch \
    TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0

# 1. The pinned dependencies, read from pyproject.toml alone, so this layer is rebuilt only when they
#    change: [project] dependencies and the job's extras for table outputs (delta: deltalake, iceberg:
#    pyiceberg). The pods run the job and nothing else (KubeRay's submitter, `ray job submit`; the
#    entrypoint `python -m app ...` on the head; Ray's workers); the commands with extras (submit:
#    kubernetes, evaluate: pycocotools, bench: psutil) run elsewhere.
#    Ray is already in the base image at the same version. torch and torchvision come from PyPI, like the
#    rest: PyPI's Linux torch 2.14.1 is the CUDA 13.0 build, the base image's CUDA, so one index gives one
#    CUDA stack. The check after the install fails the build if torch's CUDA is not the base image's;
#    tests/test_image_requirements.py resolves these pins for this platform against PyPI, so a pin without
#    a wheel fails a test rather than a build.
COPY --chown=1000:100 pyproject.toml ray-detect/
RUN python -c "import tomllib; p = tomllib.load(open('ray-detect/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['delta'] + p['optional-dependencies']['iceberg']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && python -c "import sys, torch; sys.exit(0 if torch.version.cuda == '13.0' else f'torch {torch.__version__} is built for CUDA {torch.version.cuda}, not the base image CUDA 13.0')" \
    && rm /tmp/requirements.txt

# 2. torchvision's pretrained COCO weights for every model the app offers, into TORCH_HOME/hub/checkpoints
#    where torchvision looks first (about 480 MB). Before the source, so a code change does not download
#    them again. --build-arg BAKE_WEIGHTS=false skips them (pods then need network, a checkpoint, or
#    model.weights=none); MODELS narrows the list.
ARG BAKE_WEIGHTS=true
ARG MODELS="fasterrcnn_resnet50_fpn_v2 fasterrcnn_resnet50_fpn fasterrcnn_mobilenet_v3_large_fpn fasterrcnn_mobilenet_v3_large_320_fpn"
RUN if [ "$BAKE_WEIGHTS" = "true" ]; then \
      python -c "import sys; from torchvision.models import get_model_weights; [get_model_weights(name).DEFAULT.get_state_dict(progress=False, check_hash=True) for name in sys.argv[1].split()]" "$MODELS"; \
    fi

# 3. The app, without dependencies (layer 1 has them). With weights baked, check that the app finds
#    each file where it looks, so a path mismatch fails the build instead of a pod, and that each file's
#    SHA-256 is the one torchvision publishes in its name (the download checked it too: check_hash).
COPY --chown=1000:100 README.md ray-detect/
COPY --chown=1000:100 app/ ray-detect/app/
RUN pip install --no-cache-dir --no-deps ./ray-detect \
    && if [ "$BAKE_WEIGHTS" = "true" ]; then \
      python -c "import sys; from app.model import baked_weights_problem; sys.exit(baked_weights_problem(sys.argv[1].split()))" "$MODELS"; \
    fi
