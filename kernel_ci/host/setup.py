"""Make a fresh Debian host ready: host packages, a running Docker engine, the buildx plugin, and a user
who may then run everything without root.

`sudo kernel-ci setup-host [--user NAME]` (or `python3 -m kernel_ci.host.setup`) is the one step that needs
root: it installs the packages (docker.io, trixie's docker-buildx without recommends, QEMU, mmdebstrap and
uidmap for the rootless guest image), starts dockerd (systemctl when systemd runs, else by hand), and gives
the invoking user (SUDO_USER, or --user) the docker and kvm groups and a subordinate id range in
/etc/subuid and /etc/subgid (mmdebstrap's unshare mode maps the guest's users into it; usermod allocates
it). Afterwards `kernel-ci build` and `test` run as that user; when something is missing they say to run
`sudo kernel-ci setup-host` instead of trying (as a user they cannot install anything).
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from kernel_ci.core import proc
from kernel_ci.core.console import console
from kernel_ci.core.errors import InfrastructureError, KernelCIError, UsageError
from kernel_ci.core.paths import cache_dir
from kernel_ci.host import aptmirror, docker

BUILD_PACKAGES = {"docker": "docker.io", "debootstrap": "debootstrap"}
TEST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mkfs.ext4": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",  # the guest rootfs, built without root (kernel_ci.guest.rootfs)
    "newuidmap": "uidmap",  # mmdebstrap's unshare mode as a user
    "patch": "patch",
}
SETUP_HOST = "sudo kernel-ci setup-host"  # the fix every "you may not" error names
USER_GROUPS = {"docker": "the engine's socket", "kvm": "/dev/kvm (TCG works without it, only slower)"}
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
SUBID_COUNT = 65536  # a Debian tree uses ids up to 65534
SUBID_FIRST = 100000  # where useradd starts allocating (login.defs SUB_UID_MIN)
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
            f"  run `{SETUP_HOST}` (or: sudo apt-get install -y {' '.join(missing)})"
        )
    console.print(f"installing host packages: {' '.join(missing)}")
    apt_install(missing)


def _sbin(command: str) -> bool:
    return any(Path(d, command).exists() for d in ("/usr/sbin", "/sbin"))


def _docker_answers() -> tuple[bool, str]:
    return docker.engine_version()


def systemd_runs() -> bool:
    """Whether systemd is PID 1 (its documented test: sd_booted(3)); containers and microVMs often lack it."""
    return Path("/run/systemd/system").is_dir()


def denied(detail: str) -> bool:
    """Whether `docker info` failed because this user may not use the engine's socket."""
    return "permission denied" in detail.lower()


def ensure_docker_engine() -> str:
    """A running Docker engine: its server version. Starts dockerd when allowed: through systemd when it
    runs, else by hand (left running: the engine outlives us)."""
    ensure_commands({"docker": "docker.io"})
    ok, detail = _docker_answers()
    if ok:
        return detail
    if not is_root() and denied(detail):
        raise HostSetupError(
            f"user {current_user()} may not use the Docker engine ({detail.splitlines()[-1]}).\n"
            f"  run `{SETUP_HOST}` (it adds you to the docker group),\n"
            "  then log in again or run `newgrp docker`"
        )
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
            f"  run `{SETUP_HOST}` (it starts dockerd; with systemd: sudo systemctl start docker)"
        )
    if systemd_runs():
        console.print("starting the Docker engine (systemctl enable --now docker)")
        proc.run(["systemctl", "enable", "--now", "docker"], quiet=True)
        return _wait_for_engine("journalctl -u docker")
    log = cache_dir("logs") / "dockerd.log"
    console.print(f"starting the Docker engine (log: {log})")
    with log.open("ab") as handle:
        proc.spawn([dockerd], stdout=handle, stderr=proc.STDOUT)  # left running: the engine outlives us
    return _wait_for_engine(f"{log}:\n{log.read_text()[-2000:]}")


def _wait_for_engine(where: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ok, detail = _docker_answers()
        if ok:
            return detail
        time.sleep(0.5)
    raise HostSetupError(f"dockerd did not come up within 30 s; see {where}")


def buildx_available() -> bool:
    return docker.buildx_available()


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
    """What the build half needs to run containers (the engine, debootstrap for the base image); returns the
    engine version. The buildx plugin is ensured by whoever builds an image (build.images), not here: a
    build-cache hit would pay `docker buildx version` (~60 ms) for a plugin it never runs."""
    version = ensure_docker_engine()
    ensure_commands(BUILD_PACKAGES)
    return version


def prepare_test_host() -> None:
    """Everything the test half needs on the host (QEMU, qemu-img, mmdebstrap, mkfs.ext4)."""
    ensure_commands(TEST_PACKAGES)
    if not is_root() and Path("/dev/kvm").exists() and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        console.print(
            f"[yellow]note:[/] /dev/kvm is there but {current_user()} may not use it: QEMU falls back to "
            f"TCG (slow); `{SETUP_HOST}` adds you to the kvm group"
        )


# -- the user who runs kernel-ci afterwards ---------------------------------------------------------------


class SetupUsageError(UsageError):
    """setup-host was asked for something it cannot do (not root, no such user): exit 2."""


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def target_user(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """Who setup-host prepares: --user, else the user sudo ran it for (SUDO_USER), else nobody (root)."""
    name = explicit or environ.get("SUDO_USER") or None
    if name is None or name == "root":
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise SetupUsageError(f"no user {name!r} on this host (--user NAME or SUDO_USER)") from None
    return name


def missing_groups(user: str) -> list[str]:
    """The USER_GROUPS that exist on this host and that user is not in yet."""
    wanted = []
    for name in USER_GROUPS:  # (the dict says why each)
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        if user not in group.gr_mem and pwd.getpwnam(user).pw_gid != group.gr_gid:
            wanted.append(name)
    return wanted


def subid_ranges(text: str) -> list[tuple[str, int, int]]:
    """(owner, first, count) of every well-formed line of an /etc/subuid-style file."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            ranges.append((fields[0], int(fields[1]), int(fields[2])))
    return ranges


def has_subids(user: str, texts: list[str]) -> bool:
    return all(any(o == user and n >= SUBID_COUNT for o, _, n in subid_ranges(t)) for t in texts)


def free_subid_start(texts: list[str]) -> int:
    """The first SUBID_COUNT-aligned start at or above SUBID_FIRST that overlaps no range in any file."""
    end = SUBID_FIRST
    for text in texts:
        for _, first, count in subid_ranges(text):
            end = max(end, first + count)
    return -(-end // SUBID_COUNT) * SUBID_COUNT


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def prepare_user(user: str) -> None:
    """The groups and the subordinate ids USER needs to run kernel-ci without root."""
    groups = missing_groups(user)
    if groups:
        console.print(f"adding {user} to the groups: {' '.join(groups)}")
        proc.run(["usermod", "-aG", ",".join(groups), user], quiet=True)
    texts = [_read(path) for path in SUBID_FILES]
    if not has_subids(user, texts):
        first = free_subid_start(texts)
        span = f"{first}-{first + SUBID_COUNT - 1}"
        console.print(f"giving {user} the subordinate ids {span} (/etc/subuid, /etc/subgid)")
        proc.run(["usermod", "--add-subuids", span, "--add-subgids", span, user], quiet=True)


def setup_host(user: str | None) -> None:
    """`kernel-ci setup-host`: as root, the packages, the engine and (when given) the user."""
    if not is_root():
        raise SetupUsageError(f"setting up the host needs root, once: run `{SETUP_HOST}`")
    version = prepare_build_host()
    ensure_buildx()
    prepare_test_host()
    console.print(f"host ready: Docker engine {version}, buildx, QEMU, mmdebstrap")
    if user is None:
        console.print("no user to prepare (run through sudo, or pass --user NAME)")
        return
    prepare_user(user)
    console.print(
        f"{user} may now run kernel-ci without root "
        "(a new group applies at the next login, or `newgrp docker`)"
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m kernel_ci.host.setup [--user NAME]`: the same as `kernel-ci setup-host`."""
    parser = argparse.ArgumentParser(prog="python3 -m kernel_ci.host.setup", description=__doc__)
    parser.add_argument("--user", help="the user to prepare (default: $SUDO_USER, the one who ran sudo)")
    args = parser.parse_args(argv)
    try:
        setup_host(target_user(args.user, os.environ))
    except KernelCIError as exc:
        console.print("[bold red]error:[/]", str(exc))
        sys.exit(int(exc.exit_code))


if __name__ == "__main__":
    main()
