"""CI checks of Dockerfile (server) and Dockerfile.downloader. No engine can build images here, so: hadolint (warning
level) and checkov's Dockerfile checks on both, the project's facts about each (pins, entrypoints, non-root), and the
downloader's install steps run for real in a clean virtual environment, whose entrypoint then downloads from the local
Hub stand-in. A deliberately broken Dockerfile (tests/fixtures/deploy/) shows the linters can fail."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import tomllib
from packaging.requirements import Requirement

from hubstub import HubStub
from test_manifests import FIXTURES, ROOT, output, run_tool, tool

DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.downloader"]
BROKEN = FIXTURES / "Dockerfile.broken"


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def pins(path: pathlib.Path) -> dict[str, str]:
    """Every "name==version" that a RUN ... pip install line installs (normalized name -> version)."""
    found = {}
    for word, args in instructions(path):
        if word == "RUN" and "pip install" in args:
            for name, version in re.findall(r'"([A-Za-z0-9_.\-\[\]]+)==([^"]+)"', args):
                found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def unpinned_pip_args(path: pathlib.Path) -> list[str]:
    bad = []
    for word, args in instructions(path):
        if word != "RUN":
            continue
        for cmd in args.split("&&"):
            if "pip install" not in cmd:
                continue
            skip_next = False
            for tok in cmd.split("pip install", 1)[1].split():
                if skip_next:  # the value of an option such as --no-binary NAME
                    skip_next = False
                    continue
                if tok in ("--no-binary", "--only-binary", "-c", "--constraint", "-i", "--index-url"):
                    skip_next = True
                    continue
                if tok.startswith("-") or tok.startswith("/") or tok in (".",):
                    continue
                if "==" not in tok:
                    bad.append(tok)
    return bad


def entrypoint(path: pathlib.Path) -> list[str]:
    eps = [args for word, args in instructions(path) if word == "ENTRYPOINT"]
    assert len(eps) == 1, eps
    return json.loads(eps[0])  # exec form, or this raises


# --------------------------------------------------------------------------------------------------------- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    p = run_tool([tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)])
    assert p.returncode == 0, output(p)


def test_hadolint_catches_a_broken_dockerfile():
    p = run_tool([tool("hadolint"), "--failure-threshold", "warning", str(BROKEN)])
    assert p.returncode != 0, output(p)
    for rule in ("DL3007", "DL3013", "DL3025"):  # :latest, unpinned pip, shell-form ENTRYPOINT
        assert rule in p.stdout, output(p)


def _checkov_dockerfile(*files: pathlib.Path) -> subprocess.CompletedProcess:
    argv = [tool("checkov"), "--skip-download", "--framework", "dockerfile", "--compact", "--quiet"]
    for f in files:
        argv += ["--file", str(f)]
    return run_tool(argv, timeout=300)


def test_checkov_dockerfiles():
    p = _checkov_dockerfile(*DOCKERFILES)
    assert p.returncode == 0, output(p)
    assert "Passed checks" in p.stdout, output(p)


def test_checkov_catches_a_root_image():
    p = _checkov_dockerfile(BROKEN)
    assert p.returncode != 0 and "CKV_DOCKER_3" in p.stdout, output(p)  # no USER: the container runs as root


# -------------------------------------------------------------------------------------------------- project facts


def _user(path: pathlib.Path) -> str:
    users = [args for word, args in instructions(path) if word == "USER"]
    assert users, f"{path.name} has no USER"
    return users[-1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_pinned_and_exec_form(dockerfile):
    user = _user(dockerfile).split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {user}: numeric and not root (runAsNonRoot can verify it)"
    froms = [args for word, args in instructions(dockerfile) if word == "FROM"]
    for image in froms:
        tag = image.split()[0].rsplit(":", 1)
        assert len(tag) == 2 and tag[1] != "latest" and re.search(r"\d", tag[1]), f"unpinned base image {image}"
    assert not unpinned_pip_args(dockerfile), unpinned_pip_args(dockerfile)
    for word, args in instructions(dockerfile):
        if word == "COPY":
            for src in args.split()[:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"


def test_server_image_facts():
    df = ROOT / "Dockerfile"
    ins = instructions(df)
    text = " ".join(a for _, a in ins)
    base = next(a for w, a in ins if w == "FROM")
    assert base.startswith("nvidia/cuda:") and "-devel-" in base and "cudnn" in base, base
    assert entrypoint(df) == ["bloom-server", "launch"]
    assert ("EXPOSE", "8080") in ins
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in text and "DS_BUILD_TRANSFORMER_INFERENCE=1" in text
    p = pins(df)
    assert p["torch"] == "2.13.0" and p["deepspeed"] == "0.19.8" and p["transformers"] == "4.43.4"
    assert p["tokenizers"].startswith("0.19.") and int(p["huggingface-hub"].split(".")[0]) < 1


def test_server_pins_satisfy_pyproject():
    """Every runtime dependency of pyproject.toml (and the deepspeed extra) is pinned in the Dockerfile to a version
    the project's own ranges allow."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["deepspeed"]]
    p = pins(ROOT / "Dockerfile")
    problems = []
    for r in reqs:
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        if name not in p:
            problems.append(f"{r.name}: not pinned in Dockerfile")
        elif not r.specifier.contains(p[name], prereleases=True):
            problems.append(f"{r.name}=={p[name]} does not satisfy pyproject's {r}")
    assert not problems, "\n".join(problems)


def test_downloader_image_facts():
    df = ROOT / "Dockerfile.downloader"
    assert entrypoint(df) == ["bloom-server", "download"]
    p = pins(df)
    assert "torch" not in p and "fastapi" not in p and "transformers" not in p
    assert p["huggingface-hub"] == pins(ROOT / "Dockerfile")["huggingface-hub"]
    installs = [a for w, a in instructions(df) if w == "RUN" and "pip install" in a and "/src" in a]
    assert installs and all("--no-deps" in a for a in installs), "the package goes in without its server deps"


# ---------------------------------------------------------------------------------- downloader install, for real


def test_downloader_install_steps_in_a_clean_venv(tmp_path):
    """Dockerfile.downloader's pip steps (the same pins, --no-deps, then the package itself with --no-deps) in a fresh
    virtual environment; its ENTRYPOINT answers --help and downloads from the local Hub stand-in, with no torch,
    FastAPI or transformers installed."""
    df = ROOT / "Dockerfile.downloader"
    base = next(a for w, a in instructions(df) if w == "FROM")
    tag_version = re.match(r"python:(\d+)\.(\d+)", base)
    assert tag_version and (int(tag_version[1]), int(tag_version[2])) == sys.version_info[:2], (
        f"{base} is not the Python this test runs ({sys.version_info[:2]}): the check would prove nothing"
    )
    venv = tmp_path / "venv"
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-deps"]
        + [f"{n}=={v}" for n, v in pins(df).items()],
        [str(venv / "bin/python"), "-m", "pip", "check"],
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-deps", str(ROOT)],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    for argv in steps:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert p.returncode == 0, f"{argv[:6]}...\n{output(p)}"
    probe = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import importlib.util as u; print([m for m in ('torch', 'fastapi', "
            "'transformers', 'pydantic', 'bloom_server') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "['bloom_server']", output(probe)

    exe = entrypoint(df)
    cmd = [str(venv / "bin" / exe[0]), *exe[1:]]
    help_ = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert help_.returncode == 0 and "--local-dir" in help_.stdout and "--allow-patterns" in help_.stdout, output(help_)

    with HubStub() as hub:
        sha = hub.add_repo("org/tiny", {"config.json": b"{}", "tokenizer.json": b"{}", "w.bin": os.urandom(4096)})
        denv = dict(env, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1")
        denv.pop("HF_TOKEN", None)
        d = tmp_path / "model"
        p = subprocess.run(
            cmd + ["--repo-id", "org/tiny", "--local-dir", str(d)],
            capture_output=True,
            text=True,
            timeout=120,
            env=denv,
            cwd=tmp_path,
        )
    assert p.returncode == 0, output(p)
    assert json.loads((d / ".bloom-download.json").read_text())["commit"] == sha


def test_fact_checks_catch_the_broken_dockerfile():
    assert unpinned_pip_args(BROKEN) == ["huggingface-hub"]
    with pytest.raises(json.JSONDecodeError):
        entrypoint(BROKEN)  # shell form
    with pytest.raises(AssertionError, match="has no USER"):
        _user(BROKEN)
