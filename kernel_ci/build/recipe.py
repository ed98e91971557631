"""The recipe key: a build's inputs hashed from the repository's files alone, before anything is built.

The build cache is keyed by the *build key* (the final .config and the toolchain fingerprint, i.e. every
package version inside the builder image, are part of it), and the cheaper *request key* still needs the
fingerprint, so both need Docker and the builder image. A CI cache (actions/cache) must be looked up before
that, so `kernel-ci key` hashes what determines them, as files. All three keys are derived from one
`kernel_ci.build.plan.BuildPlan`, so they carry the same inputs:

- the source: every candidate tarball of the requested version or alias, with its pinned sha256 (a version
  that falls back to another is keyed by the whole candidate list);
- the chosen series (in order) and every patch of them (bytes); the merged kconfig fragment (base, series,
  every guest suite's needs, extra fragments: the same text the pipeline merges); the kselftest targets of
  every suite; the out-of-tree modules' sources;
- the toolchain *recipe*: the builder image tag, itself a digest of containers/base/recipe.toml and every
  file of containers/builder/ (Dockerfile, packages.lock);
- the build flags.

Equal recipe keys give equal build keys as long as the mirror serves the same package versions for the
pinned toolchain; a different recipe key always means a different build. So it is a sound actions/cache key
for the build cache (an exact hit restores the build; the pipeline still verifies by its own key).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kernel_ci.build import keys as buildkey
from kernel_ci.build import plan as buildplan
from kernel_ci.build.extmodules import ModuleRoots
from kernel_ci.core.paths import KERNEL_PATCHES, MODULE_PATH, SUITE_PATH
from kernel_ci.guest.suites import SuiteRoots

RECIPE_SCHEMA = buildplan.RECIPE_SCHEMA


def recipe_manifest(
    kernel: str | None = None,
    series: Sequence[str] | None = None,
    fragments: Sequence[Path] = (),
    *,
    suites_dir: SuiteRoots | None = SUITE_PATH,
    patches_root: Path = KERNEL_PATCHES,
    modules_root: ModuleRoots = MODULE_PATH,
) -> dict[str, str]:
    """name -> digest of every input of the build that `kernel-ci build` with the same options would run."""
    planned = buildplan.make_plan(
        kernel, series, fragments, suites_dir=suites_dir, patches_root=patches_root, modules_root=modules_root
    )
    return planned.plan.recipe_inputs()


def recipe_key(manifest: dict[str, str]) -> str:
    return buildkey.build_key(manifest)
