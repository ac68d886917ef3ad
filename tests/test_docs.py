"""Docs that cannot rot: the ``sh`` blocks of README.md and docs/deploy.md.

Every block is classified below: run here as written (``RUN``), run as written by
another test (``ELSEWHERE``), or not runnable in CI with the reason (``SKIP``).  A new
or changed block that is not classified fails :func:`test_every_block_is_classified`.
Every ``gdoictl`` command line in any block, runnable or not, must name a command a
daemon serves, and every ``gdoid`` line must parse.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from gdoid.cli.daemon import build_parser
from gdoid.cli.gdoictl import WAIT_STATES, UsageError, _parse_wait, parse_command_line
from gdoid.commands import BOTH_ROLES_COMMANDS, GM_ONLY_COMMANDS, KS_ONLY_COMMANDS, match
from tests.procs import GDOID

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/deploy.md")
_BLOCK = re.compile(r"(?m)^(#+ .*)$|^```(\w*)\n((?:.*\n)*?)```")

# (file, heading, first command of the block) -> classification
RUN, ELSEWHERE, SKIP = "run", "elsewhere", "skip"
BLOCKS: dict[tuple[str, str], tuple[str, str]] = {
    ("README.md", "apt-get update && apt-get install -y python3-venv"): (
        SKIP,
        "installs Debian packages on the host; .ci/run does the same install",
    ),
    ("README.md", "apt-get update && DEBIAN_FRONTEND=noninteractive"): (
        ELSEWHERE,
        ".ci/run runs this command (it is the test suite itself)",
    ),
    ("README.md", ". .venv/bin/activate"): (RUN, "test_readme_running_daemons"),
    ("README.md", "compose/demo.sh basic"): (ELSEWHERE, "tests/test_demo.py runs it"),
    ("README.md", "tshark -i lo -f 'udp port 848' -w reg.pcap"): (RUN, "test_readme_wireshark"),
    ("docs/deploy.md", "docker build -t gdoid:latest ."): (
        SKIP,
        "needs Docker Hub (CI has no registry); compose/build-base.sh is tested instead",
    ),
    ("docs/deploy.md", "python3 -m pip wheel --wheel-dir compose/wheels"): (
        ELSEWHERE,
        "compose/build-base.sh runs these steps (tests/interop)",
    ),
    ("docs/deploy.md", "docker network create --subnet 198.18.100.0/24 gdoid-net"): (
        SKIP,
        "creates host-wide Docker networks and /srv/gdoid; the compose tests cover the image",
    ),
    ("docs/deploy.md", "docker logs -f gdoid-ks"): (
        SKIP,
        "day-to-day commands on running containers",
    ),
    ("docs/deploy.md", "docker rm -f gdoid-gm1 gdoid-ks"): (
        SKIP,
        "the cleanup of the docker run example",
    ),
    ("docs/deploy.md", "compose/build-base.sh"): (
        ELSEWHERE,
        "tests/interop builds the images with it",
    ),
    ("docs/deploy.md", "cd compose/basic"): (ELSEWHERE, "tests/interop/test_compose.py"),
    ("docs/deploy.md", 'docker run --rm --network none -v "$PWD/capture:/capture:ro"'): (
        ELSEWHERE,
        "tests/interop/test_compose.py reads the captures",
    ),
    ("docs/deploy.md", "docker-compose down -v"): (ELSEWHERE, "tests/interop/test_compose.py"),
    ("docs/deploy.md", "python3 -m pytest -q -p no:cacheprovider tests/interop"): (
        ELSEWHERE,
        "part of the test suite",
    ),
    ("docs/deploy.md", "python3 -m venv /opt/gdoid && /opt/gdoid/bin/pip install ."): (
        ELSEWHERE,
        "tests/test_systemd_nspawn.py runs it in a booted Debian root",
    ),
    ("docs/deploy.md", "systemctl status gdoid-ks"): (
        ELSEWHERE,
        "tests/test_systemd_nspawn.py (status, journal, reload, health)",
    ),
}


def sh_blocks() -> list[tuple[str, str, str]]:
    """(file, heading, text) of every ```sh block."""
    out = []
    for name in DOCS:
        heading = ""
        for m in _BLOCK.finditer((REPO / name).read_text()):
            if m.group(1):
                heading = m.group(1)
            elif m.group(2) == "sh":
                out.append((name, heading, m.group(3)))
    return out


def _key(name: str, text: str) -> tuple[str, str] | None:
    first = text.splitlines()[0]
    return next((k for k in BLOCKS if k[0] == name and first.startswith(k[1])), None)


def test_every_block_is_classified() -> None:
    blocks = sh_blocks()
    unclassified = [f"{n} {h}: {t.splitlines()[0]}" for n, h, t in blocks if _key(n, t) is None]
    assert not unclassified, "classify these blocks in tests/test_docs.py:\n" + "\n".join(
        unclassified
    )
    stale = set(BLOCKS) - {_key(n, t) for n, _h, t in blocks}
    assert not stale, f"blocks no longer in the docs: {stale}"


def _commands(tool: str) -> list[list[str]]:
    """Every ``tool`` invocation in the blocks, as words (up to a comment, pipe or &&)."""
    found = []
    for _name, _heading, text in sh_blocks():
        for line in text.replace("\\\n", " ").splitlines():
            for m in re.finditer(rf"(?:^|[\s/]){tool}(?::latest)?\s+([^#&;|>\n]*)", line):
                words = re.sub("['\"]", "", m.group(1).replace("'|'", "")).split()
                if words and not words[0].startswith("/"):  # not "ln -s .../gdoid /usr/local/bin/"
                    found.append(words)
    return found


KNOWN = (
    *KS_ONLY_COMMANDS,
    *GM_ONLY_COMMANDS,
    *BOTH_ROLES_COMMANDS,
    "show crypto gdoi [group <group>]",
    "reload",
    "health",
    "show gdoid health",
)


def test_documented_gdoictl_commands_exist() -> None:
    cmds = _commands("gdoictl")
    assert len(cmds) >= 8
    for words in cmds:
        while words and words[0].startswith("--"):  # --socket PATH, --timeout S, --yes, --json
            words = words[2:] if words[0] in ("--socket", "--timeout") else words[1:]
        if words[0] == "wait":
            assert _parse_wait(words[1:])[0] in WAIT_STATES
            continue
        try:
            command, _filters = parse_command_line(words)
        except UsageError as exc:  # pragma: no cover - the assertion message
            raise AssertionError(f"gdoictl {' '.join(words)}: {exc}") from None
        assert any(match(command, p) is not None for p in KNOWN), (
            f"no daemon serves: gdoictl {' '.join(words)}"
        )


def test_documented_gdoid_command_lines_parse() -> None:
    cmds = [w for w in _commands("gdoid") if w[0] in ("ks", "gm", "lab")]
    assert len(cmds) >= 5
    for words in cmds:
        try:
            build_parser().parse_args(words)
        except SystemExit:  # pragma: no cover - the assertion message
            raise AssertionError(f"gdoid {' '.join(words)} does not parse") from None


def _script(text: str, tmp: Path) -> str:
    """A block as a script: "# in one terminal" lines run in the background; /tmp -> tmp."""
    lines = ["set -e", "trap 'st=$?; kill $(jobs -p) 2>/dev/null || true; wait; exit $st' EXIT"]
    for line in text.splitlines():
        line = line.replace("/tmp/", f"{tmp}/")
        if re.search(r"#\s*in (one terminal|another)", line):
            line = line.split("#", 1)[0].rstrip() + " &"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _run_block(first: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    text = next(t for n, _h, t in sh_blocks() if t.startswith(first))
    env = dict(os.environ)
    activate = tmp / ".venv" / "bin" / "activate"  # the README's venv, here the one under test
    activate.parent.mkdir(parents=True, exist_ok=True)
    activate.write_text(f'PATH="{Path(GDOID).parent}:$PATH"\n' if GDOID else "")
    if GDOID:  # the gdoid and gdoictl under test first on PATH
        env["PATH"] = f"{Path(GDOID).parent}:{env['PATH']}"
    return subprocess.run(
        ["bash", "-c", _script(text, tmp)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.root
def test_readme_running_daemons(tmp_path: Path) -> None:
    res = _run_block(". .venv/bin/activate", tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gm registered: group GET with KS 127.0.0.1" in res.stdout
    assert "Group Member ID    : 127.0.0.2" in res.stdout  # the list is no longer empty


@pytest.mark.root
def test_readme_wireshark(tmp_path: Path) -> None:
    res = _run_block("tshark -i lo -f 'udp port 848' -w reg.pcap", tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Internet Security Association and Key Management Protocol" in res.stdout
    assert "Identity Protection (Main Mode)" in res.stdout
