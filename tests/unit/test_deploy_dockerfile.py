"""infra/docker/Dockerfile builds the one service image the way the project needs, checked without a Docker engine.

The Dockerfile is read instruction by instruction: Python 3.11 slim base (the version pyproject requires), CPU torch
by default with a build argument for CUDA wheels, a regular `pip install .`, a non-root user, the `agentforge`
entry point; every COPY source exists and survives the build's ignore file, and together they hold every package
pyproject installs. Broken Dockerfiles must be refused.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from docker.utils.build import PatternMatcher
from packaging.specifiers import SpecifierSet

from tests.deploy_support import DOCKERFILE, REPO

pytestmark = pytest.mark.unit

# BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile before the context's .dockerignore.
DOCKERIGNORE = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
BASE_IMAGE = re.compile(r"^python:(\d+\.\d+)-slim$")
ROOT_USERS = {"root", "0", "0:0", "root:root"}

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
    return result


def build_args(steps: list[Instruction]) -> dict[str, str]:
    """ARG defaults, for expanding ${NAME} the way an argument-less `docker build` does."""
    defaults = {}
    for keyword, arguments in steps:
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            defaults.setdefault(name, default)
    return defaults


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def stages(steps: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for step in steps:
        if step[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(step)
    return result


def ignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def installed_package_dirs(root: Path) -> set[str]:
    """The top-level folders `pip install .` packages (pyproject's setuptools find include patterns)."""
    find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    where = root / find.get("where", ["."])[0]
    return {path.name for path in where.iterdir() if (path / "__init__.py").is_file()
            and any(fnmatch.fnmatch(path.name, pattern) for pattern in find.get("include", ["*"]))}


def dockerfile_problems(text: str, ignore_text: str, root: Path) -> list[str]:
    steps = instructions(text)
    args = build_args(steps)
    problems = []
    required_python = SpecifierSet(tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"])
    for keyword, arguments in steps:
        if keyword == "FROM":
            image = expand(arguments.split()[0], args)
            match = BASE_IMAGE.match(image)
            if match is None:
                problems.append(f"FROM {image}: every stage should start from python:3.X-slim")
            elif f"{match.group(1)}.0" not in required_python:
                problems.append(f"FROM {image}: pyproject requires Python {required_python}")

    runs = [expand(arguments, args) for keyword, arguments in steps if keyword == "RUN"]
    if not any(re.search(r"pip install (--\S+ )*\.(\s|$)", run) for run in runs):
        problems.append("no RUN does a regular `pip install .` (entry points must be in installed metadata)")
    if any(re.search(r"pip install .*(-e|--editable)\b", run) for run in runs):
        problems.append("an editable install needs the source tree at run time; install it regularly")
    if not any("download.pytorch.org/whl/cpu" in run and "torch" in run for run in runs):
        problems.append("torch must come from the CPU wheel index by default (PyPI's Linux wheel bundles CUDA)")

    final = stages(steps)[-1] if stages(steps) else []
    users = [arguments for keyword, arguments in final if keyword == "USER"]
    if not users or users[-1] in ROOT_USERS:
        problems.append("the final stage must switch to a non-root USER")
    entrypoints = [arguments for keyword, arguments in final if keyword == "ENTRYPOINT"]
    if not entrypoints or entrypoints[-1] != '["agentforge"]':
        problems.append('the final stage must have ENTRYPOINT ["agentforge"] (exec form, so signals reach it)')

    excluded = PatternMatcher(ignore_patterns(ignore_text))
    copied = set()
    for keyword, arguments in steps:
        if keyword not in ("COPY", "ADD") or "--from=" in arguments:
            continue
        sources = [part for part in shlex.split(arguments) if not part.startswith("--")][:-1]
        for source in sources:
            path = source.rstrip("/")
            copied.add(path)
            if not (root / path).exists():
                problems.append(f"{keyword} {source}: no such path in the build context")
            elif excluded.matches(path):
                problems.append(f"{keyword} {source}: excluded from the context by {DOCKERIGNORE.name}")
    for package in sorted(installed_package_dirs(root) - copied):
        problems.append(f"package folder {package}/ is installed by pyproject but never copied into the image")
    return problems


def test_dockerfile_builds_the_service_image_as_required():
    assert dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text(), REPO) == []


def test_build_context_keeps_sources_and_drops_the_rest():
    excluded = PatternMatcher(ignore_patterns(DOCKERIGNORE.read_text()))
    assert not excluded.matches("shared/settings.py") and not excluded.matches("pyproject.toml")
    for path in (".venv/bin/python", ".git/config", "tests/conftest.py", "shared/__pycache__/settings.cpython-311.pyc",
                 "infra/docker/s3.env"):
        assert excluded.matches(path), path


def test_gpu_variant_is_one_build_argument():
    steps = instructions(DOCKERFILE.read_text())
    assert build_args(steps)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert any("${TORCH_INDEX_URL}" in arguments for keyword, arguments in steps if keyword == "RUN")


BREAKS = {
    "runs as root": (lambda t: t.replace("USER 10001\n", ""), "non-root USER"),
    "explicitly root": (lambda t: t.replace("USER 10001", "USER root"), "non-root USER"),
    "wrong Python": (lambda t: t.replace("python:3.11-slim", "python:3.12-slim"), "requires Python"),
    "editable install": (lambda t: t.replace("pip install . &&", "pip install -e . &&"), "editable"),
    "CUDA torch by default": (lambda t: t.replace("whl/cpu", "whl/cu128"), "CPU wheel index"),
    "copies a missing folder": (lambda t: t.replace("COPY services ./services", "COPY service ./services"),
                                "COPY service"),
    "package left out": (lambda t: t.replace("COPY services ./services\n", ""), "services/"),
    "shell-form entry point": (lambda t: t.replace('ENTRYPOINT ["agentforge"]', "ENTRYPOINT agentforge"),
                               "ENTRYPOINT"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_broken_dockerfiles_are_refused(case):
    breaker, expected = BREAKS[case]
    text = DOCKERFILE.read_text()
    broken = breaker(text)
    assert broken != text, "the break did not apply"
    problems = dockerfile_problems(broken, DOCKERIGNORE.read_text(), REPO)
    assert problems and any(expected in p for p in problems), problems


def test_an_ignore_file_that_drops_a_package_is_refused():
    problems = dockerfile_problems(DOCKERFILE.read_text(), DOCKERIGNORE.read_text() + "shared/\n", REPO)
    assert any("excluded from the context" in p for p in problems), problems
