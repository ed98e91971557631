"""The recipe key: a build's inputs hashed from the repository's files alone, before anything is built.

The build cache is keyed by the *build key* (ci.buildkey): the final .config and the toolchain fingerprint
(every package version inside the builder image) are part of it, and the cheaper *request key* still needs
the fingerprint, so both need Docker and the builder image. A CI cache (actions/cache) must be looked up
before that, so `kernel-ci key` hashes what determines them, as files:

- the source: every candidate tarball of the requested version or alias, with its pinned sha256 (a version
  that falls back to another is keyed by the whole candidate list);
- every patch of the chosen series (bytes), the merged kconfig fragment (base, series, guest suites, extra
  fragments: the same text the pipeline merges), the out-of-tree modules' sources;
- the toolchain *recipe*: the builder image tag, itself a digest of containers/base/recipe.toml and every
  file of containers/builder/ (Dockerfile, packages.lock);
- the build flags.

Equal recipe keys give equal build keys as long as the mirror serves the same package versions for the
pinned toolchain; a different recipe key always means a different build. So it is a sound actions/cache key
for the build cache (an exact hit restores the build; the pipeline still verifies by its own key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from ci import builder, buildkey, extmodules, images, kconfig, patches, source
from ci.paths import KCONFIG_DIR, KERNEL_MODULES, KERNEL_PATCHES

RECIPE_SCHEMA = "kernel-ci-recipe-1"


def recipe_manifest(
    kernel: str | None = None,
    series: Sequence[str] | None = None,
    fragments: Sequence[Path] = (),
    extra_fragments: Sequence[kconfig.Fragment] = (),
    *,
    patches_root: Path = KERNEL_PATCHES,
    modules_root: Path = KERNEL_MODULES,
) -> dict[str, str]:
    """name -> digest of every input of the build that `kernel-ci build` with the same options would run."""
    from ci.buildpipeline import BUILD_TARGETS

    lock = source.load_lock()
    candidates = lock.candidates(kernel)
    chosen = patches.discover_series(patches_root, None if series is None else list(series))
    merged = kconfig.merge(
        [kconfig.Fragment.from_file(KCONFIG_DIR / "base.config", "kconfig/base.config")]
        + [kconfig.Fragment.from_file(f, f"series {s.name}: {f.name}") for s in chosen for f in s.fragments]
        + list(extra_fragments)
        + [kconfig.Fragment.from_file(Path(f)) for f in fragments]
    )
    manifest = {
        "schema": RECIPE_SCHEMA,
        "source": " ".join(f"linux-{t.version} sha256:{t.sha256 or 'unpinned'}" for t in candidates),
        "toolchain-recipe": images.builder_image_tag(images.base_image_tag()),
        "fragment": hashlib.sha256(merged.render().encode()).hexdigest(),
        "flag:arch": builder.ARCH,
        "flag:targets": BUILD_TARGETS,
        "flag:kbuild": f"user={builder.KBUILD_USER} host={builder.KBUILD_HOST} version=1 timestamp=source",
    }
    for one in chosen:
        manifest.update({f"patch:{name}": digest for name, digest in patches.series_digest(one).items()})
    if modules_root.is_dir():
        manifest.update(extmodules.digests(extmodules.discover(modules_root)))
    return manifest


def recipe_key(manifest: dict[str, str]) -> str:
    return buildkey.build_key(manifest)
