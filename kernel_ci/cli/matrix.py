"""The CI workflow's kernel matrix, read as data from kernel_ci/cli/matrix.toml and checked against the lock
file.

Standard library only, so the workflow's first job runs it with a bare Python (``python3 -m
kernel_ci.cli.matrix
--github-output``) before anything is installed; ``kernel-ci matrix`` prints the same JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

from kernel_ci.core.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[2]
MATRIX_FILE = Path(__file__).resolve().parent / "matrix.toml"
SOURCES_LOCK = REPO_ROOT / "kernel-sources.lock.toml"


class MatrixError(UsageError):
    """The matrix file is malformed or names a version the lock file does not know."""


def lock_names(lock_path: Path = SOURCES_LOCK) -> set[str]:
    """Every version (tarball) and alias the lock file defines."""
    data = tomllib.loads(lock_path.read_text())
    return set(data.get("tarballs", {})) | set(data.get("aliases", {}))


def load_matrix(path: Path = MATRIX_FILE, lock_path: Path = SOURCES_LOCK) -> list[str]:
    """The kernels of the matrix, in order; each must be a version or alias of the lock file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MatrixError(f"cannot read the kernel matrix {path}: {exc}") from exc
    kernels = data.get("kernels")
    if not isinstance(kernels, list) or not kernels or not all(isinstance(k, str) and k for k in kernels):
        raise MatrixError(f"{path}: `kernels` must be a non-empty list of version strings")
    duplicates = sorted({k for k in kernels if kernels.count(k) > 1})
    if duplicates:
        raise MatrixError(f"{path}: listed more than once: {', '.join(duplicates)}")
    known = lock_names(lock_path)
    unknown = [k for k in kernels if k not in known]
    if unknown:
        raise MatrixError(
            f"{path}: {', '.join(unknown)} not in {lock_path.name} (known: {', '.join(sorted(known))}); "
            "pin the tarball there first"
        )
    return list(kernels)


def matrix_json(kernels: list[str]) -> str:
    """The `strategy.matrix` value for fromJSON: {"kernel": [...]}."""
    return json.dumps({"kernel": kernels}, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernel_ci.cli.matrix", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--file", type=Path, default=MATRIX_FILE)
    parser.add_argument(
        "--github-output", action="store_true", help="also append matrix=<json> to $GITHUB_OUTPUT"
    )
    args = parser.parse_args(argv)
    try:
        text = matrix_json(load_matrix(args.file))
    except MatrixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.github_output:
        target = os.environ.get("GITHUB_OUTPUT")
        if not target:
            print("error: --github-output given but GITHUB_OUTPUT is not set", file=sys.stderr)
            return 2
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(f"matrix={text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
