"""The transformers versions this package is tested against, and the start-up check that refuses others.

Model-facing behaviour changes between transformers minor versions in ways that do not fail loudly (5.17
ignores AutoProcessor registrations for native configs; 5.2x renamed the cache keyword, which older
versions silently swallow): a run on an untested version could sample from one distribution and score
another. So the declared range (pyproject) is the tested range, and anything else is refused here.
"""

from __future__ import annotations

import os
import warnings

from packaging.version import Version

# Inclusive minor versions: the lowest is what CI's low-version job installs (.ci/run), the highest
# what constraints.txt pins. Widen only together with those.
LOWEST_TESTED = "5.17"
HIGHEST_TESTED = "5.24"
OVERRIDE_ENV = "VISUAL_RFT_ALLOW_UNTESTED_TRANSFORMERS"


def is_tested(version: str) -> bool:
    minor = Version(Version(version).base_version)
    low, high = Version(LOWEST_TESTED), Version(HIGHEST_TESTED)
    return low <= minor and (minor.major, minor.minor) <= (high.major, high.minor)


def check_transformers(version: str | None = None) -> None:
    """Raise (or, with VISUAL_RFT_ALLOW_UNTESTED_TRANSFORMERS=1, warn) on an untested transformers."""
    if version is None:
        import transformers

        version = transformers.__version__
    if is_tested(version):
        return
    message = (f"transformers {version} is not tested with visual-rft (tested: {LOWEST_TESTED} to "
               f"{HIGHEST_TESTED}.x). Install a tested version, e.g. pip install 'transformers=={HIGHEST_TESTED}.*', "
               f"or set {OVERRIDE_ENV}=1 to run anyway (check log-probs against a plain forward first: "
               "pytest tests/test_families.py tests/test_rl_equivalence.py).")
    if os.environ.get(OVERRIDE_ENV) == "1":
        warnings.warn(message, stacklevel=2)
        return
    raise RuntimeError(message)
