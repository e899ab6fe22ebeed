"""Print the lowest and the newest transformers releases that pyproject.toml's range admits and pip can
install, as ``LOWEST NEWEST``, resolved now from the package index (not pinned by hand)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

root = Path(__file__).resolve().parent.parent
dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
spec = next(Requirement(d) for d in dependencies if Requirement(d).name == "transformers").specifier
listing = subprocess.run(
    [sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True, check=True
).stdout
available = re.search(r"Available versions:(.*)", listing).group(1)
versions = sorted(
    v for v in (Version(t.strip()) for t in available.split(",") if t.strip()) if not v.is_prerelease and v in spec
)
if not versions:
    sys.exit(f"no transformers release satisfies {spec}")


def installable(version: Version) -> bool:
    """Whether pip can install this release with its dependencies from the index now (a release can
    be published before a dependency it pins is: pip then resolves a new user's ``pip install -e .``
    to an older one, so that is the newest release a user gets)."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", f"transformers=={version}"],
                          capture_output=True, text=True)
    return done.returncode == 0


lowest = next((v for v in versions if installable(v)), None)
if lowest is None:
    sys.exit(f"no transformers release in {spec} can be installed from the index")
newest = next(v for v in reversed(versions) if installable(v))
print(lowest, newest)
