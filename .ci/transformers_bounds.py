"""Print the lowest and the newest transformers releases that pyproject.toml's range admits, as
``LOWEST NEWEST``, resolved now from the package index (not pinned by hand)."""

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
print(versions[0], versions[-1])
