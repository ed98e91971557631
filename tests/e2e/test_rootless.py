"""Root once, then a user: `kernel-ci setup-host --user NAME` as root, then that (real, non-root) user runs
`kernel-ci test --suite smoke-c` (kernel-ci as pipx installed it from this checkout's wheel, nothing from
the checkout on PYTHONPATH) in its own copy of the repository and owns everything it leaves behind.

The user's caches start cold. The kernel comes the way a teammate's would: from a build cache service
started here, to which root's (warm) build entry is published; the user's run restores it. The guest rootfs
is built by the user with mmdebstrap (unshare mode), which is the rootless rootfs test. Attacks: a user
cannot make kernel-ci or its containers create anything owned by root.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernel_ci.cache.remote import CacheClient, RemoteConfig, RemoteStore
from kernel_ci.cache.store import LocalStore
from kernel_ci.core.settings import default_cache_root
from kernel_ci.flow.build import BuildRequest, build
from tests.cacheservice import REPO, TOKEN, server_process
from tests.pipxinstall import Installed, pipx_install

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates a user and runs setup-host: needs root"),
]


@dataclass(frozen=True)
class User:
    name: str
    home: Path
    checkout: Path  # the user's own copy of the repository: the project (found from the current directory)
    tool: Installed  # kernel-ci as pipx installed it from this checkout's wheel (tests/pipxinstall.py)

    def run(
        self, *args: str, cwd: Path | None = None, timeout: float = 1500
    ) -> subprocess.CompletedProcess[str]:
        """`kernel-ci ARGS` as this user, with a clean login-like environment."""
        env = [f"HOME={self.home}", "PATH=/usr/local/bin:/usr/bin:/bin"]
        argv = ["runuser", "-u", self.name, "--", "env", "-i", *env, str(self.tool.tool)]
        return subprocess.run(
            [*argv, *args],
            cwd=cwd or self.checkout,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def foreign_files(self, *roots: Path) -> list[str]:
        """Everything under roots not owned by this user (uid and gid)."""
        existing = [str(r) for r in roots if r.exists()]
        if not existing:
            return []
        found = subprocess.run(
            ["find", *existing, "(", "-not", "-user", self.name, "-o", "-not", "-group", self.name, ")"],
            capture_output=True,
            text=True,
            check=True,
        )
        return found.stdout.splitlines()


def said(done: subprocess.CompletedProcess[str]) -> str:
    """What a run printed (the console writes to stderr), with rich's line wrapping undone."""
    return " ".join((done.stdout + done.stderr).split())


def _copy_repository(dest: Path) -> None:
    """The tracked and new files of this checkout (no .git, .venv or out/): what a user's clone holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if rel.startswith((".venv/", "out/")) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    name = f"kci-rl{os.getpid() % 100000}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    home = Path(pwd.getpwnam(name).pw_dir)
    work = Path(tempfile.mkdtemp(prefix="kci-user-pipx-"))
    try:
        installed = pipx_install(work)  # made readable by every user
        checkout = home / "kernel-ci"
        _copy_repository(checkout)
        subprocess.run(["chown", "-R", f"{name}:{name}", str(checkout)], check=True)
        yield User(name, home, checkout, installed)
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def set_up(user: User) -> User:
    """`kernel-ci setup-host --user NAME`, as root: the only root step."""
    done = subprocess.run(
        [sys.executable, "-m", "kernel_ci.cli.main", "setup-host", "--user", user.name],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert user.name in grp.getgrnam("docker").gr_mem
    for path in ("/etc/subuid", "/etc/subgid"):
        assert any(line.startswith(f"{user.name}:") for line in Path(path).read_text().splitlines())
    return user


def test_before_setup_host_a_user_is_told_to_run_it(user: User) -> None:
    """Runs first (module order): the user is not in the docker group yet."""
    if user.name in grp.getgrnam("docker").gr_mem:
        pytest.skip("setup-host already ran for this user")
    done = user.run("build")
    assert done.returncode == 7, done.stdout + done.stderr
    assert "may not use the Docker engine" in said(done) and "run `sudo kernel-ci setup-host`" in said(done)
    done = user.run("setup-host")
    assert done.returncode == 2 and "needs root, once" in said(done)


def test_after_setup_host_a_user_runs_the_smoke_suite_and_owns_everything(
    set_up: User, tmp_path_factory: pytest.TempPathFactory
) -> None:
    user = set_up
    server_dir = tmp_path_factory.mktemp("rootless-service")
    with server_process(server_dir / "data") as server:
        # a teammate (root here, with a warm cache) publishes the kernel the user's run will need
        store = RemoteStore(
            LocalStore(default_cache_root(os.environ) / "builds"),
            CacheClient(RemoteConfig(server.url, TOKEN)),
        )
        built = build(BuildRequest(output=server_dir / "root-out"), store=store)
        entry = store.local.get(built.key)
        assert entry is not None
        store.push(built.key, entry)

        done = user.run("test", "--suite", "smoke-c", "--cache-url", server.url, timeout=2400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "rootfs: built" in output and "mmdebstrap" in output  # the user built the guest image, rootless
    cache = user.home / ".cache" / "kernel-ci"
    assert list((cache / "rootfs").glob("bookworm-*.qcow2")), "no rootfs in the user's cache"
    assert (user.checkout / "out").is_dir()
    assert user.foreign_files(user.checkout / "out", cache) == []


def test_a_user_cannot_point_output_at_a_root_owned_place(set_up: User) -> None:
    target = Path(tempfile.mkdtemp(prefix="kci-root-owned-"))  # root's, 0700
    try:
        for output in (target / "out", Path("/etc/kci-attack")):
            done = set_up.run("-o", str(output), "build")
            assert done.returncode == 2, done.stdout + done.stderr
            assert "pick a directory you own" in said(done)
            assert not output.exists()
        assert list(target.iterdir()) == []
    finally:
        shutil.rmtree(target)


def test_a_user_cannot_make_docker_create_root_owned_dirs(set_up: User) -> None:
    """With `-v`, dockerd (root) creates a missing bind-mount source as root: this made /var/lib/<x>/y,
    owned by root, as the user, before the seam wrote `--mount`."""
    target = Path("/var/lib") / f"kci-attack-{os.getpid()}"
    script = (
        "from kernel_ci.build import images\n"
        "from kernel_ci.host import docker\n"
        "import os, sys\n"
        "image = images.ensure_base_image()\n"
        "user = f'{os.getuid()}:{os.getgid()}'\n"
        f"docker.run_capture(image, ['true'], ['--user', user, '-v', '{target}/y:/mnt'])\n"
    )
    env = [f"HOME={set_up.home}", "PATH=/usr/bin:/bin"]
    done = subprocess.run(
        ["runuser", "-u", set_up.name, "--", "env", "-i", *env, str(set_up.tool.python), "-c", script],
        cwd=set_up.checkout,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        assert done.returncode != 0
        assert "bind source path does not exist" in done.stderr
        assert not target.exists()
    finally:
        shutil.rmtree(target, ignore_errors=True)
