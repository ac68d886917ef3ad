"""Control socket and gdoictl, over real Unix sockets in tmp_path."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gdoid.cli import gdoictl
from gdoid.control import (
    MAX_LINE,
    ControlRequest,
    ControlResponse,
    ControlServer,
    request,
)

PROMPT_1 = (
    "\n% This GM-Removal immediate message will cleanup all GMs downloaded policies\n"
    "% This will cause all GMs to re-register.\n"
    "Are you sure you want to proceed? ? [yes/no]: "
)
PROMPT_2 = (
    "WARNING for group GET: some devices cannot support GM-REMOVAL and can cause network\n"
    "disruption. Please check 'show crypto gdoi feature'.\n"
    "Are you sure you want to proceed ? [yes/no]: "
)
FEATURE_OUTPUT = """
 Group Name: GET
 Key Server ID Version Feature Supported
 10.0.8.1 1.0.2 Yes
 10.0.9.1 1.0.2 Yes

 Group Member ID Version Feature Supported
 10.0.0.2 1.0.2 Yes
 10.0.0.3 1.0.1 No
"""


@dataclass
class FakeDaemon:
    """A handler behaving like the KS console for a few commands."""

    calls: list[ControlRequest] = field(default_factory=list)
    primary: bool = True

    async def __call__(self, req: ControlRequest) -> ControlResponse:
        self.calls.append(req)
        words = " ".join(req.command)
        if words == "show crypto gdoi feature gm-removal":
            return ControlResponse(
                ok=True, output=FEATURE_OUTPUT, data={"gms": {"10.0.0.3": False}}
            )
        if words == "clear crypto gdoi ks members now":
            if not self.primary:
                return ControlResponse.failure(
                    "ERROR for group GET: can only execute this command on Primary KS"
                )
            prompts = (PROMPT_1, PROMPT_2)
            if req.confirm < len(prompts):
                return ControlResponse.confirm_needed(*prompts)
            return ControlResponse(ok=True, output="Sending GM-Removal message to group GET...")
        if words == "hang":
            await asyncio.Event().wait()
        if words == "boom":
            raise RuntimeError("kaboom")
        if words == "unserialisable":
            return ControlResponse(ok=True, data={1, 2})
        return ControlResponse.failure(f"% Invalid input: {words}")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Path, FakeDaemon]]:
    path = tmp_path / "run" / "ks.sock"
    handler = FakeDaemon()
    server = ControlServer(path, handler)
    await server.start()
    try:
        yield path, handler
    finally:
        await server.close()


async def ctl(argv: list[str]) -> int:
    # gdoictl is synchronous (asyncio.run inside): keep it off the server's loop.
    return await asyncio.to_thread(gdoictl.main, argv)


# --------------------------------------------------------------------------- wire format


def test_request_response_json_round_trip() -> None:
    req = ControlRequest(("show", "crypto", "gdoi"), confirm=2)
    assert ControlRequest.from_json(req.to_json()) == req
    resp = ControlResponse(ok=False, output="x", data={"a": [1]}, error="e", prompts=("p?",))
    assert ControlResponse.from_json(resp.to_json()) == resp
    wire = json.loads(ControlResponse(ok=True).to_json())
    assert wire == {"ok": True, "output": "", "data": None, "error": None, "prompts": None}
    assert "\n" not in resp.to_json()


@pytest.mark.parametrize(
    "text",
    [
        "[1]",
        "{}",
        '{"command": []}',
        '{"command": "show"}',
        '{"command": ["show", 1]}',
        '{"command": ["show"], "confirm": -1}',
        '{"command": ["show"], "confirm": true}',
        "{not json",
    ],
)
def test_bad_requests_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        ControlRequest.from_json(text)


# --------------------------------------------------------------------------- server


async def test_round_trip(daemon: tuple[Path, FakeDaemon]) -> None:
    path, handler = daemon
    resp = await request(path, ControlRequest(("show", "crypto", "gdoi", "feature", "gm-removal")))
    assert resp.ok and resp.output == FEATURE_OUTPUT and resp.data == {"gms": {"10.0.0.3": False}}
    assert handler.calls == [ControlRequest(("show", "crypto", "gdoi", "feature", "gm-removal"))]


async def test_socket_mode_and_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "new" / "gm.sock"
    server = ControlServer(path, FakeDaemon())
    await server.start()
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert path.parent.is_dir()
    await server.close()
    assert not path.exists()


async def test_stale_socket_replaced_live_socket_refused(tmp_path: Path) -> None:
    path = tmp_path / "ks.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound but never listening: what a crashed daemon leaves
    stale.close()
    server = ControlServer(path, FakeDaemon())
    await server.start()
    try:
        assert (await request(path, ControlRequest(("boom",)))).ok is False
        with pytest.raises(RuntimeError, match="in use"):
            await ControlServer(path, FakeDaemon()).start()
        assert path.exists()  # the failed second start left ours alone
    finally:
        await server.close()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await ControlServer(path, FakeDaemon()).start()


async def test_bad_json_and_long_line_keep_connection(daemon: tuple[Path, FakeDaemon]) -> None:
    path, handler = daemon
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:

        async def exchange(raw: bytes) -> ControlResponse:
            writer.write(raw)
            await writer.drain()
            return ControlResponse.from_json(await asyncio.wait_for(reader.readline(), 5))

        bad = await exchange(b"{this is not json\n")
        assert not bad.ok and bad.error and bad.error.startswith("bad request: bad JSON")
        wrong = await exchange(b'{"command": "show"}\n')
        assert not wrong.ok and "command" in (wrong.error or "")
        huge = await exchange(b'{"command": ["' + b"x" * (3 * MAX_LINE) + b'"]}\n')
        assert not huge.ok and "longer than" in (huge.error or "")
        # Same connection, still in step: the tail of the huge line was not parsed.
        good = await exchange(b'{"command": ["show", "crypto", "gdoi", "feature", "gm-removal"]}\n')
        assert good.ok and good.output == FEATURE_OUTPUT
        assert len(handler.calls) == 1
    finally:
        writer.close()


async def test_handler_exception_is_contained(daemon: tuple[Path, FakeDaemon]) -> None:
    path, _ = daemon
    resp = await request(path, ControlRequest(("boom",)))
    assert resp.ok is False and resp.error == "internal error: RuntimeError: kaboom"
    resp = await request(path, ControlRequest(("unserialisable",)))
    assert resp.ok is False and (resp.error or "").startswith("internal error:")
    resp = await request(path, ControlRequest(("show", "crypto", "gdoi", "feature", "gm-removal")))
    assert resp.ok


async def test_close_with_idle_client_connected(tmp_path: Path) -> None:
    path = tmp_path / "ks.sock"
    server = ControlServer(path, FakeDaemon())
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(path))
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_close_cancels_stuck_handler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ks.sock"
    server = ControlServer(path, FakeDaemon())
    await server.start()
    pending = asyncio.create_task(request(path, ControlRequest(("hang",)), timeout=10))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(server.close(), 5)
    with pytest.raises(ConnectionError):
        await pending
    assert not path.exists()
    assert "Exception in callback" not in caplog.text


# --------------------------------------------------------------------------- gdoictl


async def test_confirm_flow_yes(
    daemon: tuple[Path, FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, handler = daemon
    monkeypatch.setattr("sys.stdin", io.StringIO("yes\nyes\n"))
    rc = await ctl(["--socket", str(path), "clear", "crypto", "gdoi", "ks", "members", "now"])
    assert rc == 0
    assert [c.confirm for c in handler.calls] == [0, 2]
    assert capsys.readouterr().out == (
        PROMPT_1 + "yes\n" + PROMPT_2 + "yes\n" + "Sending GM-Removal message to group GET...\n"
    )


async def test_confirm_flow_assume_yes(
    daemon: tuple[Path, FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, handler = daemon
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # must not be read
    rc = await ctl(["--socket", str(path), "--yes", "clear crypto gdoi ks members now"])
    assert rc == 0 and [c.confirm for c in handler.calls] == [0, 2]
    out = capsys.readouterr().out
    assert out.endswith("[yes/no]: yes\nSending GM-Removal message to group GET...\n")
    assert out.count("[yes/no]: yes\n") == 2


@pytest.mark.parametrize(
    ("answers", "transcript"),
    [
        ("no\n", PROMPT_1 + "no\n"),  # IOS aborts silently: nothing after the answer
        ("yes\nno\n", PROMPT_1 + "yes\n" + PROMPT_2 + "no\n"),
        ("yes\ny\n", PROMPT_1 + "yes\n" + PROMPT_2 + "y\n"),  # only "yes" confirms
        ("yes\n", PROMPT_1 + "yes\n" + PROMPT_2 + "\n"),  # EOF counts as no
    ],
)
async def test_confirm_flow_abort(
    daemon: tuple[Path, FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answers: str,
    transcript: str,
) -> None:
    path, handler = daemon
    monkeypatch.setattr("sys.stdin", io.StringIO(answers))
    rc = await ctl(["--socket", str(path), "clear", "crypto", "gdoi", "ks", "members", "now"])
    assert rc == 1
    assert [c.confirm for c in handler.calls] == [0]  # never sent confirm=2
    assert capsys.readouterr().out == transcript


@pytest.mark.parametrize(
    "words",
    [
        ["show", "crypto", "gdoi", "feature", "gm-removal", "|", "include", "No"],
        ["show crypto gdoi feature gm-removal | include No"],
        ["show crypto gdoi feature gm-removal |", "inc No"],
    ],
)
async def test_include_filter(
    daemon: tuple[Path, FakeDaemon], capsys: pytest.CaptureFixture[str], words: list[str]
) -> None:
    path, handler = daemon
    assert await ctl(["--socket", str(path), *words]) == 0
    assert capsys.readouterr().out == " 10.0.0.3 1.0.1 No\n"
    assert handler.calls[0].command == ("show", "crypto", "gdoi", "feature", "gm-removal")


async def test_exclude_and_begin_filters(
    daemon: tuple[Path, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = daemon
    cmd = "show crypto gdoi feature gm-removal"
    assert await ctl(["--socket", str(path), f"{cmd} | begin Group Member | exclude Yes"]) == 0
    assert (
        capsys.readouterr().out
        == " Group Member ID Version Feature Supported\n 10.0.0.3 1.0.1 No\n"
    )


async def test_refusal_printed_on_stdout(
    daemon: tuple[Path, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, handler = daemon
    handler.primary = False
    assert await ctl(["--socket", str(path), "clear crypto gdoi ks members now"]) == 1
    assert capsys.readouterr().out == (
        "ERROR for group GET: can only execute this command on Primary KS\n"
    )


async def test_json_output(
    daemon: tuple[Path, FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = daemon
    assert await ctl(["--socket", str(path), "--json", "show crypto gdoi feature gm-removal"]) == 0
    assert json.loads(capsys.readouterr().out) == {"gms": {"10.0.0.3": False}}


async def test_unreachable_and_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.sock"
    assert await ctl(["--socket", str(missing), "show", "crypto", "gdoi"]) == 2
    assert str(missing) in capsys.readouterr().err

    monkeypatch.delenv(gdoictl.SOCKET_ENV, raising=False)
    monkeypatch.setattr(gdoictl, "DEFAULT_SOCKETS", (tmp_path / "ks.sock", tmp_path / "gm.sock"))
    assert await ctl(["show", "crypto", "gdoi"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "ks.sock") in err and str(tmp_path / "gm.sock") in err

    assert await ctl(["--socket", str(missing)]) == 1  # no command
    assert await ctl(["--socket", str(missing), "show | grep x"]) == 1  # unknown filter
    assert await ctl(["--socket", str(missing), "show | include ("]) == 1  # bad regex


async def test_default_socket_discovery(
    daemon: tuple[Path, FakeDaemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, handler = daemon
    monkeypatch.setattr(gdoictl, "DEFAULT_SOCKETS", (path, tmp_path / "gm.sock"))
    monkeypatch.delenv(gdoictl.SOCKET_ENV, raising=False)
    assert gdoictl.default_socket() == path
    monkeypatch.setenv(gdoictl.SOCKET_ENV, str(tmp_path / "other.sock"))
    assert gdoictl.default_socket() == tmp_path / "other.sock"
    monkeypatch.setenv(gdoictl.SOCKET_ENV, str(path))
    assert await ctl(["show crypto gdoi feature gm-removal"]) == 0
    assert len(handler.calls) == 1
