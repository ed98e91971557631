"""`kernel-ci setup-host`: who it prepares, the subordinate id range it picks, and the errors a user gets."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from kernel_ci.cli.main import main
from kernel_ci.core.errors import ExitCode
from kernel_ci.host import setup


def test_the_user_is_the_one_given_else_the_one_sudo_ran_for() -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    assert setup.target_user(None, {"SUDO_USER": "nobody"}) == "nobody"
    assert setup.target_user("nobody", {"SUDO_USER": me}) == "nobody"
    assert setup.target_user(None, {}) is None  # plain root: nobody to prepare
    assert setup.target_user(None, {"SUDO_USER": "root"}) is None


def test_an_unknown_user_is_a_usage_error() -> None:
    with pytest.raises(setup.SetupUsageError, match="no user 'no-such-user-kci'"):
        setup.target_user("no-such-user-kci", {})


def test_subordinate_ranges_are_read_and_a_free_one_is_picked() -> None:
    subuid = "alice:100000:65536\n# comment\nbroken line\nbob:165536:65536\n"
    subgid = "alice:100000:65536\ncarol:300000:10\n"
    assert setup.has_subids("alice", [subuid, subgid])
    assert not setup.has_subids("bob", [subuid, subgid])  # no gid range
    start = setup.free_subid_start([subuid, subgid])
    assert start == 327680 and start % setup.SUBID_COUNT == 0  # after carol's 300000..300009
    assert setup.free_subid_start(["", ""]) == 131072  # the first aligned start at or above 100000


def test_setup_host_as_a_user_says_to_use_sudo() -> None:
    if os.geteuid() == 0:
        pytest.skip("needs a non-root user (tests/e2e/test_rootless.py runs it as one)")
    assert main(["setup-host"]) == ExitCode.USAGE


def test_docker_permission_denied_is_recognised() -> None:
    detail = (
        "permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock"
    )
    assert setup.denied(detail)
    assert not setup.denied("Cannot connect to the Docker daemon. Is the docker daemon running?")


def test_the_open_file_limit_is_raised_to_the_hard_one() -> None:
    """A user's soft limit (1024 on Debian) made every restore of a build entry fail (one fd a directory)."""
    code = (
        "import resource\n"
        "from kernel_ci.cli.main import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "raise_open_file_limit()\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
