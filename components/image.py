"""The one container image every component runs in (built from the repository's Dockerfile).

``BASE_IMAGE`` is what the components are declared with; the image a compiled pipeline pulls is a compile
setting: ``ctrl compile --image REF``, else the chart values' ``image`` (repository + tag or digest) when
compiling with ``--chart``/``-f``, else ``$CTRL_PIPELINE_IMAGE``, else ``DEFAULT_IMAGE``. Locally (kfp.local,
``ctrl run``) the image is not used.
"""

import os

#: the image a release of this package is built and published as (Dockerfile; charts/ctrl-pipeline values)
DEFAULT_IMAGE = "ghcr.io/ctrl-pipeline/ctrl-pipeline:0.1.0"
#: set CTRL_PIPELINE_IMAGE when compiling to pin the image (e.g. by digest) that the cluster pulls
BASE_IMAGE = os.environ.get("CTRL_PIPELINE_IMAGE") or DEFAULT_IMAGE
