"""`kernel-ci setup-host`: the one command that needs root (kernel_ci.host.setup does the work)."""

from __future__ import annotations

import argparse
import os


def cmd_setup_host(args: argparse.Namespace) -> int:
    from kernel_ci.host import setup

    setup.setup_host(setup.target_user(args.user, os.environ))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "setup-host",
        help="as root, once: host packages, dockerd, and the docker/kvm groups and subordinate ids of a user",
        description="Install and start what kernel-ci needs (docker.io, buildx, QEMU, mmdebstrap, uidmap) "
        "and "
        "prepare a user to run it without root. Run it with sudo.",
    )
    parser.add_argument(
        "--user", help="the user to prepare (default: $SUDO_USER, the one who ran sudo; none as plain root)"
    )
    parser.set_defaults(func=cmd_setup_host)
