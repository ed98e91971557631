"""Make a fresh Debian host ready: host packages, a running Docker engine, the buildx plugin.

As root on a Debian-family host the missing pieces are installed and dockerd is started; anywhere else the
error says exactly which command to run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from kernel_ci.core import proc
from kernel_ci.core.console import console
from kernel_ci.core.errors import InfrastructureError
from kernel_ci.core.paths import cache_dir
from kernel_ci.host import aptmirror

BUILD_PACKAGES = {"docker": "docker.io", "debootstrap": "debootstrap"}
TEST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "debootstrap": "debootstrap",
    "patch": "patch",
}
BUILDX_PLUGIN_DIRS = (
    Path("/usr/libexec/docker/cli-plugins"),
    Path("/usr/lib/docker/cli-plugins"),
    Path("/usr/local/lib/docker/cli-plugins"),
    Path.home() / ".docker/cli-plugins",
)
TRIXIE_SOURCE = Path("/etc/apt/sources.list.d/kernel-ci-trixie.sources")
TRIXIE_PIN = Path("/etc/apt/preferences.d/kernel-ci-trixie")


class HostSetupError(InfrastructureError):
    pass


def is_root() -> bool:
    return os.geteuid() == 0


def is_debian_family() -> bool:
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def can_install() -> bool:
    return is_root() and is_debian_family() and os.environ.get("KERNEL_CI_NO_INSTALL") != "1"


_apt_updated = False


def apt_install(packages: list[str], *, extra: list[str] | None = None) -> None:
    global _apt_updated
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        proc.run(["apt-get", "update", "-q"], env=env, quiet=True)
        _apt_updated = True
    proc.run(["apt-get", "install", "-y", "-q", *(extra or []), *packages], env=env, quiet=True)


def ensure_commands(wanted: dict[str, str]) -> None:
    """Install the Debian package of every command in `wanted` (command -> package) that is missing."""
    missing = sorted({pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None and not _sbin(cmd)})
    if not missing:
        return
    if not can_install():
        raise HostSetupError(
            f"missing host packages: {' '.join(missing)}\n"
            f"  install them: sudo apt-get install -y {' '.join(missing)}"
        )
    console.print(f"installing host packages: {' '.join(missing)}")
    apt_install(missing)


def _sbin(command: str) -> bool:
    return any(Path(d, command).exists() for d in ("/usr/sbin", "/sbin"))


def _docker_answers() -> tuple[bool, str]:
    return proc.probe(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=20)


def ensure_docker_engine() -> str:
    """A running Docker engine: its server version. Starts dockerd (no systemd here) when allowed."""
    ensure_commands({"docker": "docker.io"})
    ok, detail = _docker_answers()
    if ok:
        return detail
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
    if dockerd is None:
        if not can_install():
            raise HostSetupError(
                "the Docker engine is not installed (only a client is).\n"
                "  install and start it: sudo apt-get install -y docker.io && sudo dockerd &"
            )
        apt_install(["docker.io"])
        dockerd = "/usr/sbin/dockerd"
        ok, detail = _docker_answers()
        if ok:
            return detail
    if not is_root():
        raise HostSetupError(
            f"the Docker engine is not running ({detail}).\n"
            "  start it: sudo systemctl start docker\n"
            "  (without systemd: sudo dockerd >/var/log/dockerd.log 2>&1 &)\n"
            "  and make sure your user may use it: sudo usermod -aG docker $USER (then log in again)"
        )
    log = cache_dir("logs") / "dockerd.log"
    console.print(f"starting the Docker engine (log: {log})")
    with log.open("ab") as handle:
        proc.spawn([dockerd], stdout=handle, stderr=proc.STDOUT)  # left running: the engine outlives us
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ok, detail = _docker_answers()
        if ok:
            return detail
        time.sleep(0.5)
    raise HostSetupError(f"dockerd did not come up within 30 s; see {log}:\n{log.read_text()[-2000:]}")


def buildx_available() -> bool:
    return proc.probe(["docker", "buildx", "version"])[0]


def ensure_buildx() -> None:
    """The buildx CLI plugin (BuildKit) that python-on-whales drives. Debian 12 lacks it; trixie has it."""
    if buildx_available():
        return
    instructions = (
        "add a trixie apt source with a low pin priority (100), then:\n"
        "  sudo apt-get install -y --no-install-recommends docker-buildx/trixie\n"
        "  (without --no-install-recommends apt replaces docker.io's client and removes the engine)"
    )
    if not can_install():
        raise HostSetupError(f"the docker buildx plugin (BuildKit) is missing.\n  {instructions}")
    bases = aptmirror.archive_bases("debian")
    if not bases:
        raise HostSetupError(f"no Debian mirror found in /etc/apt to install buildx from.\n  {instructions}")
    console.print("installing docker-buildx from trixie (pinned low, no recommends)")
    TRIXIE_SOURCE.write_text(
        f"Types: deb\nURIs: {bases[0]}\nSuites: trixie\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    TRIXIE_PIN.write_text("Package: *\nPin: release n=trixie\nPin-Priority: 100\n")
    global _apt_updated
    _apt_updated = False
    apt_install(["docker-buildx/trixie"], extra=["--no-install-recommends"])
    if not buildx_available():
        raise HostSetupError(
            f"docker-buildx installed but `docker buildx version` still fails.\n  {instructions}"
        )


def prepare_build_host() -> str:
    """Everything the build half needs; returns the engine version."""
    version = ensure_docker_engine()
    ensure_buildx()
    ensure_commands(BUILD_PACKAGES)
    return version


def prepare_test_host() -> None:
    """Everything the test half needs on the host (QEMU, qemu-img, debootstrap, mkfs.ext4)."""
    ensure_commands(TEST_PACKAGES)


def main() -> None:
    """`python -m kernel_ci.host.setup`: prepare this host for both halves of the pipeline."""
    version = prepare_build_host()
    prepare_test_host()
    console.print(f"host ready: Docker engine {version}, buildx, QEMU, debootstrap")


if __name__ == "__main__":
    main()
