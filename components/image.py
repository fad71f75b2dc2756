"""The one container image every component runs in (built from the repository's Dockerfile)."""

import os

#: set CTRL_PIPELINE_IMAGE when compiling to pin the image (e.g. by digest) that the cluster pulls
BASE_IMAGE = os.environ.get("CTRL_PIPELINE_IMAGE", "ghcr.io/ctrl-pipeline/ctrl-pipeline:0.1.0")
