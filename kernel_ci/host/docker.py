"""The one seam between kernel-ci and Docker: every call to the engine goes through this module.

Images and containers are managed through python-on-whales (the design's choice): build (BuildKit), import,
pull, tag, remove, the list of containers. Errors come back as DockerError with Docker's own words.
It is imported on first use: its import (pydantic models) takes ~0.35 s, which every command paid before,
`--help` and a build-cache hit included. So the one lookup every build makes, an image's id by tag
(whether it exists, and the toolchain's identity), and whether the engine answers at all, are read from the
Engine API on the local socket (a GET of /images/NAME/json, /version: ~2 ms where the `docker` client took
~50 ms to start, three times per build-cache hit). Written by hand on http.client: no library we use speaks
HTTP over a unix socket, and docker-py would be a second Docker client beside python-on-whales for two GETs.
Where the engine is not that socket (DOCKER_HOST elsewhere, a docker context) or the socket does not answer,
the same questions go to `docker image inspect` / `docker info` through proc, whose words (permission denied,
not running) are what the host set-up reads: a build-cache hit never imports python-on-whales either way.

Running a container (`docker run`) is the exception: it goes through kernel_ci.core.proc, not
python-on-whales, because the builder's life depends on three things only proc gives:
- the output streamed line by line into our logging and progress display (kbuild prints for minutes);
- a timeout or Ctrl-C stops the whole process tree (SIGTERM, then SIGKILL to the group), which the
  `docker run` client forwards to the container;
- the held stdin: proc keeps a pipe on the client's stdin that it never writes, so the container's
  watchdog (kernel_ci.build.kbuild.WATCHDOG) sees EOF and kills the build when kernel-ci dies, even by
  SIGKILL. python-on-whales' `docker.run` takes no open-ended stdin and kills only its own child.
So this module builds the `docker run` command line (run_argv) and hands it to proc; nothing else in the
package writes a `docker` command line (tests/unit/test_docker_seam.py checks it).

Bind mounts: callers say `-v HOST:GUEST[:ro]`; run_argv writes each as `--mount type=bind,...`. With `-v`
dockerd (root) creates a missing HOST directory, owned by root, wherever it is: a user of the docker group
running kernel-ci could make root-owned directories anywhere (tests/e2e/test_rootless.py did). `--mount`
refuses a missing source instead.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from kernel_ci.core import proc
from kernel_ci.core.errors import InfrastructureError

DOCKER = "docker"  # the client binary of every `docker run`
ENGINE_TIMEOUT = 20.0  # seconds for `docker info` to answer


if TYPE_CHECKING:
    from python_on_whales import DockerClient, DockerException

NO_SUCH_IMAGE = "No such image"  # what `docker image inspect` says of a missing tag (exit 1)
DEFAULT_SOCKET = Path("/var/run/docker.sock")


class DockerError(InfrastructureError):
    """Docker refused or failed (exit 7, never a bug); the message carries its exit status and output."""


@contextmanager
def _whales(what: str) -> Iterator[DockerClient]:
    """python-on-whales' client (imported here, on first use), its errors raised as DockerError."""
    from python_on_whales import DockerException, docker

    try:
        yield docker
    except DockerException as exc:
        raise _failed(what, exc) from exc


def _failed(what: str, exc: DockerException) -> DockerError:
    """python-on-whales' error as ours: the one place DockerException is translated."""
    detail = "\n".join(part.strip() for part in (exc.stderr or "", exc.stdout or "") if part and part.strip())
    return DockerError(
        f"{what} failed (docker exit {exc.return_code}):\n{detail or exc}\nis dockerd running? `docker info`"
    )


# -- the engine ------------------------------------------------------------------------------------------


def engine_version(timeout: float = ENGINE_TIMEOUT) -> tuple[bool, str]:
    """Whether the engine answers, and its version (or why not). Not through python-on-whales: a hung dockerd
    must cost a timeout, not hang kernel-ci, and the client may not even be installed yet."""
    answer = _engine_get("/version", timeout)
    if answer is not None and answer[0] == 200 and isinstance(answer[1].get("Version"), str):
        return True, answer[1]["Version"]
    return proc.probe([DOCKER, "info", "--format", "{{.ServerVersion}}"], timeout=timeout)


# -- the Engine API on the local socket (see the module doc) ---------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def engine_socket(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path | None:
    """The unix socket of the engine the `docker` client would talk to, when that is one; None when the
    client is pointed elsewhere (DOCKER_HOST on tcp/ssh, a docker context), which only the client knows."""
    environ = os.environ if environ is None else environ
    host = environ.get("DOCKER_HOST", "")
    if host:
        return Path(host.removeprefix("unix://")) if host.startswith("unix://") else None
    if environ.get("DOCKER_CONTEXT", "default") != "default":
        return None
    config_dir = environ.get("DOCKER_CONFIG") or os.fspath((home or Path.home()) / ".docker")
    try:
        config = json.loads((Path(config_dir) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and config.get("currentContext", "default") not in ("default", ""):
        return None
    return DEFAULT_SOCKET


def _engine_get(path: str, timeout: float = ENGINE_TIMEOUT) -> tuple[int, dict] | None:
    """GET path from the Engine API: (HTTP status, JSON object); None when there is no local socket to ask,
    it refuses us, or the answer is not JSON (the caller asks the client instead)."""
    where = engine_socket()
    if where is None:
        return None
    connection = _UnixConnection(where, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = json.loads(response.read() or b"{}")
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
    return (response.status, body) if isinstance(body, dict) else None


def buildx_available() -> bool:
    """Whether the buildx CLI plugin (BuildKit), which build_image drives, is installed."""
    return proc.probe([DOCKER, "buildx", "version"])[0]


# -- images (python-on-whales) ---------------------------------------------------------------------------


def image_exists(tag: str) -> bool:
    return _inspect_image_id(tag) is not None


def image_id(tag: str) -> str:
    """The image's id (sha256:...): what toolchain records are keyed by."""
    found = _inspect_image_id(tag)
    if found is None:
        raise DockerError(f"inspecting image {tag} failed: there is no such image")
    return found


# (engine, tag) -> id seen by this process; forgotten when this process makes images. The engine
# (DOCKER_HOST) is part of the key: an id one engine gave says nothing of another's images.
_image_ids: dict[tuple[str, str], str] = {}


def _inspect_image_id(tag: str) -> str | None:
    """The id of the image TAG, None when there is none; a failure of the engine is a DockerError. An id
    once seen is remembered (a build asks whether the builder exists, then its id for the toolchain)."""
    seen = (os.environ.get("DOCKER_HOST", ""), tag)
    if seen in _image_ids:
        return _image_ids[seen]
    answer = _engine_get(f"/images/{quote(tag, safe='/:@')}/json")
    if answer is not None and answer[0] == 404:
        return None
    if answer is not None and answer[0] == 200 and str(answer[1].get("Id", "")).startswith("sha256:"):
        _image_ids[seen] = answer[1]["Id"]
        return _image_ids[seen]
    ok, output = proc.probe([DOCKER, "image", "inspect", "--format", "{{.Id}}", tag], timeout=ENGINE_TIMEOUT)
    if ok and output.startswith("sha256:"):
        _image_ids[seen] = output.split()[0]
        return _image_ids[seen]
    if NO_SUCH_IMAGE.lower() in output.lower():
        return None
    raise DockerError(f"inspecting image {tag} failed:\n{output}\nis dockerd running? `docker info`")


def pull(source: str, tag: str) -> None:
    """Pull SOURCE from its registry and tag it TAG."""
    _image_ids.clear()
    with _whales(f"pulling {source}") as docker:
        docker.pull(source)
        docker.tag(source, tag)


def import_tarball(tarball: Path, tag: str) -> str:
    """`docker import` of a root filesystem tarball as TAG; returns the new image's id."""
    _image_ids.clear()
    with _whales(f"importing {tarball} as {tag}") as docker:
        return docker.image.import_(tarball, tag=tag).id


def build_image(context: Path, dockerfile: Path, tag: str, build_args: Mapping[str, str]) -> None:
    """A BuildKit build (buildx) of CONTEXT, loaded into the engine as TAG."""
    _image_ids.clear()
    with _whales(f"building {tag}") as docker:
        docker.buildx.build(
            context, file=dockerfile, build_args=dict(build_args), tags=[tag], load=True, progress="plain"
        )


# -- containers ------------------------------------------------------------------------------------------


def remove_container(name: str) -> None:
    """Remove the container NAME, running or not; nothing to do when there is none. The usual answer,
    none, comes from the Engine API (~2 ms; the client's `container inspect` took 20-50 ms before every
    build's container); any other answer goes to the client, which removes it."""
    answer = _engine_get(f"/containers/{quote(name, safe='')}/json")
    if answer is not None and answer[0] == 404:
        return
    from python_on_whales import DockerException, docker

    try:
        if docker.container.exists(name):
            docker.container.remove(name, force=True)
    except DockerException as exc:
        if docker.container.exists(name):  # not a race with its own --rm: really still there
            raise _failed(f"removing container {name}", exc) from exc


def container_exists(name_or_id: str) -> bool:
    """Whether a container (running or stopped) of that name or id (a prefix of it) exists."""
    with _whales("listing containers") as docker:
        return any(
            c.name == name_or_id or c.id.startswith(name_or_id) for c in docker.container.list(all=True)
        )


def run_argv(image: str, command: Sequence[str], options: Sequence[str] = ()) -> list[str]:
    """The `docker run --rm` of COMMAND in IMAGE with OPTIONS (network, user, mounts...); each `-v` bind
    mount becomes a `--mount` that fails on a missing source instead of creating it as root."""
    return [DOCKER, "run", "--rm", *bind_mounts(options), image, *command]


def bind_mounts(options: Sequence[str]) -> list[str]:
    """OPTIONS with every `-v`/`--volume HOST:GUEST[:ro|rw]` of an absolute HOST path as `--mount`."""
    out: list[str] = []
    items = iter(options)
    for option in items:
        if option in ("-v", "--volume"):
            out += ["--mount", mount_spec(next(items))]
        else:
            out.append(option)
    return out


def mount_spec(volume: str) -> str:
    """`--mount` of one `-v` value. Paths with a comma, quote or '=' are refused: --mount's CSV syntax would
    read them as another field."""
    host, _, rest = volume.partition(":")
    guest, _, mode = rest.partition(":")
    if not host.startswith("/") or not guest.startswith("/") or mode not in ("", "ro", "rw"):
        raise DockerError(f"bind mount {volume!r}: expected /HOST:/GUEST[:ro]")
    if any(c in path for path in (host, guest) for c in ',"=\n'):
        raise DockerError(
            f"bind mount {volume!r}: a path with a comma, quote, '=' or newline cannot be mounted"
        )
    spec = f"type=bind,source={host},target={guest}"
    return spec + (",readonly" if mode == "ro" else "")


def run(
    image: str,
    command: Sequence[str],
    options: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    **proc_args: Any,
) -> proc.Result:
    """COMMAND in a fresh container, through proc.run (streamed, stoppable, hold_stdin: see above).

    env is the CLIENT's extra environment: what `-e NAME` options (without a value) pass into the container,
    so that a secret never appears on the logged command line."""
    return proc.run(run_argv(image, command, options), env=env, **proc_args)


def run_capture(image: str, command: Sequence[str], options: Sequence[str] = ()) -> str:
    """A short command in a fresh container; its stdout (errors carry its output)."""
    return proc.capture(run_argv(image, command, options))
