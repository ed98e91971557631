"""The CI workflow's kernel matrix, read as data from kernel_ci/cli/matrix.toml and checked against the lock
file.

One cell per kernel of `kernels`, plus one per `[[variants]]` table: a kernel built with extra kconfig
fragments (the debug cell: KASAN, lockdep, kmemleak, UBSAN). Each cell is {cell, kernel, fragments}: the
workflow names jobs and artifacts by `cell` and passes each of `fragments` (space-separated repository
paths) as a --fragment.

Standard library only, so the workflow's first job runs it with a bare Python
(``python3 -m kernel_ci.cli.matrix --github-output``) before anything is installed;
``kernel-ci matrix`` prints the same JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

from kernel_ci.core.errors import UsageError
from kernel_ci.core.paths import CHECKOUT, SOURCES_LOCK

REPO_ROOT = CHECKOUT  # the CI matrix is this checkout's (its fragments are paths in it)
MATRIX_FILE = Path(__file__).resolve().parent / "matrix.toml"


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


def _variant_cell(path: Path, table: object, kernels: list[str]) -> dict[str, str]:
    """One [[variants]] table -> a cell; its kernel must be a matrix kernel, its fragments existing files."""
    if not isinstance(table, dict) or set(table) != {"name", "kernel", "fragments"}:
        raise MatrixError(f"{path}: each [[variants]] needs exactly name, kernel and fragments")
    name, kernel, fragments = table["name"], table["kernel"], table["fragments"]
    if not isinstance(name, str) or not name.replace("-", "").isalnum():
        raise MatrixError(f"{path}: variant name {name!r} must be letters, digits and -")
    if kernel not in kernels:
        raise MatrixError(f"{path}: variant {name}: kernel {kernel!r} is not one of `kernels`")
    if not isinstance(fragments, list) or not fragments:
        raise MatrixError(f"{path}: variant {name}: `fragments` must be a non-empty list of paths")
    for fragment in fragments:
        # a path relative to the repository, passed unquoted through a shell word list: no spaces
        if not isinstance(fragment, str) or " " in fragment or not (REPO_ROOT / fragment).is_file():
            raise MatrixError(f"{path}: variant {name}: no kconfig fragment {fragment!r} in the repository")
    return {"cell": f"{kernel}-{name}", "kernel": kernel, "fragments": " ".join(fragments)}


def load_cells(path: Path = MATRIX_FILE, lock_path: Path = SOURCES_LOCK) -> list[dict[str, str]]:
    """Every cell: one per kernel (no fragment), then one per variant."""
    kernels = load_matrix(path, lock_path)
    variants = tomllib.loads(Path(path).read_text()).get("variants", [])
    if not isinstance(variants, list):
        raise MatrixError(f"{path}: `variants` must be an array of tables ([[variants]])")
    cells = [{"cell": k, "kernel": k, "fragments": ""} for k in kernels]
    cells += [_variant_cell(path, v, kernels) for v in variants]
    names = [c["cell"] for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MatrixError(f"{path}: cell listed more than once: {', '.join(duplicates)}")
    return cells


def matrix_json(cells: list[dict[str, str]]) -> str:
    """The `strategy.matrix` value for fromJSON: {"include": [cell, ...]}, one job per cell."""
    return json.dumps({"include": cells}, separators=(",", ":"))


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
        text = matrix_json(load_cells(args.file))
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
