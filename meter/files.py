"""
What the commands that write files share: making a rename or a new name
durable.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    """
    fsync C{folder}: a file created, linked or renamed in it is only sure
    to keep its name across a power loss once its folder is synced.
    """
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
