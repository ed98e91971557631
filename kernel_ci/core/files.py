"""Writing a small file so that no reader ever sees half of it: run.json, junit.xml, metadata.json, the
accelerator probe's cache. An interrupted write leaves the previous file (or none), never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text to a temporary name beside path (one per process: concurrent writers do not share it),
    then rename it over path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
