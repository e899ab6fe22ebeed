"""Walking up the Python call stack past the frames of given packages: to name the user's line in a
warning (``api``), and to find the module whose forward called a wrapped bare model
(``adapters.outer_call``)."""

from __future__ import annotations

import os
from types import FrameType


def package_folder(module_file: str) -> str:
    """The folder of a package's module file, as frames' file names spell it (absolute, not resolved
    through links: a frame's file name is the import path's), with a trailing separator."""
    return os.path.dirname(os.path.abspath(module_file)) + os.sep


#: This package's folder.
VTOKEN_FOLDER = package_folder(__file__)


def first_frame_outside(folders: tuple[str, ...], frame: FrameType | None,
                        limit: int | None = None) -> tuple[int, FrameType | None]:
    """From ``frame`` up the stack: ``(depth, first)``, the first frame whose file lies in none of
    ``folders`` and how many frames were passed over to reach it; ``first`` is None where the stack
    ends before one, or where ``limit`` frames were passed over."""
    depth = 0
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(folders):
        if limit is not None and depth >= limit:
            return depth, None
        frame, depth = frame.f_back, depth + 1
    return depth, frame
