"""Every error kernel-ci raises on purpose carries the exit code of its kind (core.errors)."""

from __future__ import annotations

import ast
import importlib
import json
import os
from pathlib import Path

import pytest
from python_on_whales import DockerException

from kernel_ci.build import images, kbuild, source
from kernel_ci.build.patches import PatchApplyError, PatchError, PatchToolMissingError
from kernel_ci.core import proc
from kernel_ci.core.errors import (
    BuildError,
    ExitCode,
    InfrastructureError,
    KernelCIError,
    UsageError,
)
from kernel_ci.host import docker

PACKAGE = Path(__file__).resolve().parents[2] / "kernel_ci"
# Errors that never leave their module: the service turns them into HTTP statuses, the results reader
# into a note in the report. They are not raised to the command line.
INTERNAL = {
    "kernel_ci.cache.server.service.ServiceError",
    "kernel_ci.cache.server.blobs.BlobError",
    "kernel_ci.cache.history.HistoryError",  # the service's 400 (a client sends what it built itself)
    "kernel_ci.report.guestfiles.GuestFileError",
}
EXPECTED = {
    "kernel_ci.bench.figures.ReadmeMarkersError": ExitCode.USAGE,
    "kernel_ci.build.patches.PatchError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.patches.SeriesError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.patches.PatchApplyError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.patches.PatchToolMissingError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.build.kconfig.KconfigError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.extmodules.ModuleBuildError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.kselftest.KselftestError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.patchexport.ExportError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.plan.PlanError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.kbuild.CompileError": ExitCode.BUILD_FAILED,
    "kernel_ci.build.images.ImageError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.host.docker.DockerError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.build.ccacherelay.RelayError": ExitCode.USAGE,  # a CCACHE_REMOTE_STORAGE it cannot relay
    "kernel_ci.build.source.SourceError": ExitCode.INFRASTRUCTURE,  # the base; raised as one of the two below
    "kernel_ci.build.source.UnknownVersionError": ExitCode.USAGE,
    "kernel_ci.build.source.SourceUnavailableError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.build.records.RecordError": ExitCode.USAGE,
    "kernel_ci.guest.placement.GuestsError": ExitCode.USAGE,  # a bad --guests or --memory
    "kernel_ci.host.setup.HostSetupError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.host.setup.SetupUsageError": ExitCode.USAGE,
    "kernel_ci.guest.rootfs.RootfsError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.guest.qemu.AccelError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.guest.interactive.GuestSessionError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.guest.payload.PayloadError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.guest.warmstart.SaveError": ExitCode.INFRASTRUCTURE,  # caught: the run boots on, cold
    "kernel_ci.guest.suites.ManifestError": ExitCode.USAGE,
    "kernel_ci.cache.store.CacheStoreError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.cache.remote.RemoteCacheError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.core.proc.CommandError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.report.junit.JunitError": ExitCode.USAGE,  # `kernel-ci summary` of a file that is not JUnit
    "kernel_ci.report.model.RunRecordError": ExitCode.USAGE,  # `kernel-ci repro` of a folder that is no run
    "kernel_ci.guest.protocol.PlanError": ExitCode.INFRASTRUCTURE,  # plan.json is ours: damaged = broken host
    "kernel_ci.cache.store.UnsafeEntryError": ExitCode.INFRASTRUCTURE,
    "kernel_ci.cli.matrix.MatrixError": ExitCode.USAGE,
    "kernel_ci.build.tree.TreeError": ExitCode.USAGE,  # --tree is not a kernel tree (or has no commit)
    "kernel_ci.flow.bisect.BisectError": ExitCode.USAGE,  # kernel-ci bisect of a tree it cannot bisect
    "kernel_ci.report.compare.BaselineError": ExitCode.INFRASTRUCTURE,  # ours, damaged or a bad upload
}


def _error_classes() -> list[str]:
    """Every `class ...Error(...)` defined in the package, read from the source (so a new one is seen)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append(f"{module}.{node.name}")
    return found


def _load(qualified: str) -> type[BaseException]:
    module, name = qualified.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("qualified", [q for q in _error_classes() if q not in INTERNAL])
def test_every_error_class_carries_an_exit_code(qualified: str) -> None:
    cls = _load(qualified)
    assert issubclass(cls, KernelCIError), f"{qualified} must derive from core.errors.KernelCIError"
    if qualified.startswith("kernel_ci.core.errors."):
        return
    assert qualified in EXPECTED, f"{qualified}: say which exit code it means in EXPECTED"
    assert cls.exit_code == EXPECTED[qualified]


def test_the_exit_codes_of_the_three_kinds() -> None:
    assert (UsageError.exit_code, BuildError.exit_code, InfrastructureError.exit_code) == (2, 10, 7)
    assert KernelCIError.exit_code == ExitCode.INFRASTRUCTURE  # an unclassified error is not the user's


def test_flaky_has_its_own_exit_code_apart_from_failed_and_every_guest_outcome() -> None:
    from kernel_ci.report.model import Outcome

    assert ExitCode.FLAKY == 8
    assert ExitCode.FLAKY not in {int(o) for o in Outcome} | {ExitCode.TEST_FAILURE, ExitCode.USAGE}


def test_a_missing_patch_tool_is_infrastructure_yet_still_a_patch_error() -> None:
    """`except PatchError` keeps catching it; its exit code says the host, not the series, is at fault."""
    assert issubclass(PatchToolMissingError, PatchError)
    assert PatchToolMissingError("patch is missing").exit_code == ExitCode.INFRASTRUCTURE
    assert PatchApplyError.exit_code == ExitCode.BUILD_FAILED


def test_an_unknown_version_is_a_usage_error() -> None:
    with pytest.raises(source.UnknownVersionError) as caught:
        source.load_lock().candidates("9.99-nonexistent")
    assert isinstance(caught.value, source.SourceError) and caught.value.exit_code == ExitCode.USAGE


def test_a_tarball_no_mirror_delivers_is_infrastructure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERNEL_CI_CACHE", str(tmp_path / "cache"))
    tarball = source.Tarball("9.9", "kernel.org", "v9.x/linux-9.9.tar.xz", "0" * 64, "linux-9.9")
    # a port nothing listens on: the download fails for real
    with pytest.raises(source.SourceUnavailableError) as caught:
        source.fetch_tarball(tarball, urls=["http://127.0.0.1:9/linux-9.9.tar.xz"])
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE


@pytest.mark.parametrize(
    ("returncode", "timed_out", "is_compile_error"),
    [
        (2, False, True),
        (1, False, True),
        (125, False, False),
        (126, False, False),
        (127, False, False),
        (137, False, False),
        (None, False, False),
        (-15, True, False),
    ],
)
def test_only_make_failing_in_the_container_is_a_build_failure(
    returncode: int | None, timed_out: bool, is_compile_error: bool
) -> None:
    """make's status passes through `docker run`; 125-127 and 137 are Docker's own (daemon, exec, OOM)."""
    exc = proc.CommandError(["docker", "run", "..."], returncode, "", timed_out=timed_out)
    assert kbuild.make_failed(exc) is is_compile_error


def test_a_failing_make_in_a_real_container_command_is_a_compile_error() -> None:
    """The real `docker run` status convention, seen through proc: `sh -c 'exit 2'` gives 2 (make's)."""
    with pytest.raises(proc.CommandError) as caught:
        proc.run(["sh", "-c", "exit 2"], quiet=True)
    assert kbuild.make_failed(caught.value)


def test_docker_not_answering_is_a_docker_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real docker client pointed at a socket that does not exist: the image lookup every build makes
    (`docker image inspect` through proc) says so as infrastructure, not as a missing image to build."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kernel-ci-test.sock")
    with pytest.raises(docker.DockerError) as caught:
        images.ensure_builder_image()
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE
    assert "docker info" in str(caught.value)


def test_python_on_whales_errors_never_reach_the_user_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-on-whales' DockerException is translated by the Docker seam (host/docker.py): DockerError."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kernel-ci-test.sock")
    with pytest.raises(docker.DockerError) as caught:
        docker.container_exists("kernel-ci-test-none")
    assert isinstance(caught.value.__cause__, DockerException)
    assert caught.value.exit_code == ExitCode.INFRASTRUCTURE
    assert "docker info" in str(caught.value)


def test_a_missing_image_is_not_an_error() -> None:
    """`docker image inspect` of a missing tag: False (the caller builds it), not a DockerError."""
    if not docker.engine_version(timeout=5)[0]:
        pytest.skip("no Docker engine answers here")
    assert docker.image_exists("kernel-ci/none:does-not-exist") is False
    with pytest.raises(docker.DockerError):
        docker.image_id("kernel-ci/none:does-not-exist")


def test_the_engine_api_on_the_socket_answers_as_the_docker_client_does() -> None:
    """The socket path (image ids, the engine's version) and `docker` itself agree, on a real engine."""
    if not docker.engine_version(timeout=5)[0]:
        pytest.skip("no Docker engine answers here")
    ok, client_version = proc.probe(["docker", "info", "--format", "{{.ServerVersion}}"])
    assert ok and docker.engine_version() == (True, client_version)
    tags = proc.capture(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"]).split()
    tags = [tag for tag in tags if not tag.endswith(":<none>")][:3]
    for tag in tags:
        docker._image_ids.pop(tag, None)
        expected = proc.capture(["docker", "image", "inspect", "--format", "{{.Id}}", tag]).strip()
        assert docker.image_id(tag) == expected


def test_a_stale_container_is_removed_and_none_is_nothing_to_do() -> None:
    """remove_container asks the socket whether there is one (404: done) and the client to remove one."""
    if not docker.engine_version(timeout=5)[0]:
        pytest.skip("no Docker engine answers here")
    from kernel_ci.build import images

    name = f"kernel-ci-test-stale-{os.getpid()}"
    docker.remove_container(name)  # none: nothing to do, no error
    proc.capture(["docker", "create", "--name", name, images.ensure_builder_image(), "true"])
    assert docker.container_exists(name)
    docker.remove_container(name)
    assert not docker.container_exists(name)


@pytest.mark.parametrize(
    ("environ", "config", "expected"),
    [
        ({}, None, docker.DEFAULT_SOCKET),
        ({"DOCKER_HOST": "unix:///run/user/1000/docker.sock"}, None, Path("/run/user/1000/docker.sock")),
        ({"DOCKER_HOST": "tcp://10.0.0.1:2375"}, None, None),
        ({"DOCKER_HOST": "ssh://builder"}, None, None),
        ({"DOCKER_CONTEXT": "remote"}, None, None),
        ({"DOCKER_CONTEXT": "default"}, None, docker.DEFAULT_SOCKET),
        ({}, {"currentContext": "rootless"}, None),
        ({}, {"currentContext": "default"}, docker.DEFAULT_SOCKET),
        ({}, "not json", docker.DEFAULT_SOCKET),
    ],
)
def test_the_engine_socket_is_asked_only_where_the_client_would_go(
    tmp_path: Path, environ: dict[str, str], config: object, expected: Path | None
) -> None:
    """A client pointed elsewhere (tcp, ssh, a context) is asked through `docker`; only it knows the way."""
    if config is not None:
        (tmp_path / ".docker").mkdir()
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / ".docker" / "config.json").write_text(text)
    assert docker.engine_socket(environ, home=tmp_path) == expected


def test_an_engine_socket_that_does_not_answer_falls_back_to_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No socket there: the client's own words come back (what the host set-up reads), no exception."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kernel-ci-test.sock")
    ok, detail = docker.engine_version(timeout=5)
    assert not ok and detail
    with pytest.raises(docker.DockerError, match="inspecting image"):
        docker.image_exists("kernel-ci/none:does-not-exist")


@pytest.mark.slow
def test_a_module_that_does_not_compile_is_a_build_failure(tmp_path: Path) -> None:
    """Real make in the real builder container against a cached kernel build: a compile error is the
    kernel's inputs' fault (10), not Docker's (7)."""
    import json

    from kernel_ci.build import extmodules
    from kernel_ci.cache.store import LocalStore

    entry = next(
        (
            found
            for key, _manifest in LocalStore().manifests()
            if (found := LocalStore().get(key)) is not None and (found / "kbuild").is_dir()
        ),
        None,
    )
    if entry is None:
        pytest.skip("no kernel build in the local build cache to build a module against")
    image = json.loads((entry / "metadata.json").read_text())["toolchain"]["image"]
    module = tmp_path / "broken"
    module.mkdir()
    (module / "Kbuild").write_text("obj-m := broken.o\n")
    (module / "broken.c").write_text('#include <linux/module.h>\nthis is not C;\nMODULE_LICENSE("GPL");\n')
    with pytest.raises(extmodules.ModuleBuildError) as caught:
        extmodules.build(image, entry / "kbuild", extmodules.ModuleSource("broken", module), tmp_path / "out")
    assert caught.value.exit_code == ExitCode.BUILD_FAILED
    assert "broken.c" in str(caught.value)
