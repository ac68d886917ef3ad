"""Scale: 200 group members register at once with a real ``gdoid ks`` process.

The KS runs as its own process (UDP 127.0.1.1, a free high port).  The GMs are in-process
:class:`GroupMemberEngine` initiators, each with its own UDP socket on its own
loopback address (127.0.1.2 ... 127.0.1.201, ephemeral port), so the KS sees
200 distinct members.  One asyncio task drives every engine's timers; each GM's
``on_event("registered")`` sets its own :class:`asyncio.Event`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from gdoid.config.loader import load_gm_config
from gdoid.groupmember.engine import Registration
from tests.procs import (
    Daemon,
    auth_toml,
    free_udp_port,
    gdoictl_json,
    gm_toml,
    ks_toml,
)
from tests.udpgms import (
    GmEndpoint,
    drive_timers,
    make_engine,
)

KS_ADDRESS = "127.0.1.1"
GROUP = 1234
GM_COUNT = 200
GUARD = 45.0  # overall guard: registration of all 200 normally takes well under 5 s


def gm_address(i: int) -> str:
    return f"127.0.1.{2 + i}"


async def test_200_group_members_register_concurrently(lab: Path) -> None:
    auth = auth_toml("psk.secret")
    template = load_gm_config(
        gm_toml(
            lab,
            address=gm_address(0),
            name="gm-template",
            auth=auth,
            servers=(KS_ADDRESS,),
            server_port=(port := free_udp_port(KS_ADDRESS)),
            ike="[ike]\ndh_groups = [19]\n",
        )
    )
    with Daemon("ks", ks_toml(lab, address=KS_ADDRESS, port=port, auth=auth)) as ks:
        await asyncio.to_thread(ks.wait_for, "ks_started")
        loop = asyncio.get_running_loop()
        registered = [asyncio.Event() for _ in range(GM_COUNT)]
        failures: list[tuple[int, str]] = []

        def on_event_for(i: int) -> Callable[[str, Registration], None]:
            def on_event(what: str, reg: Registration) -> None:
                if what == "registered":
                    registered[i].set()
                elif what == "failed":
                    failures.append((i, reg.last_failure))

            return on_event

        endpoints: list[GmEndpoint] = []
        try:
            for i in range(GM_COUNT):
                engine = make_engine(template, gm_address(i), on_event_for(i))
                _, ep = await loop.create_datagram_endpoint(
                    lambda engine=engine: GmEndpoint(engine), local_addr=(gm_address(i), 0)
                )
                endpoints.append(ep)
            timers = asyncio.create_task(drive_timers(endpoints))
            try:
                now = time.time()
                for ep in endpoints:  # all started at once
                    ep.send(ep.engine.start(now))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in registered)), GUARD)
            finally:
                timers.cancel()
        finally:
            for ep in endpoints:
                if ep.transport is not None:
                    ep.transport.close()

        assert failures == []
        assert all(ep.engine.registrations[GROUP].registered_at is not None for ep in endpoints)
        assert sum(ep.engine.counters["registrations_failed"] for ep in endpoints) == 0

        ks_group = (
            await asyncio.to_thread(gdoictl_json, lab / "ks.sock", "show", "crypto", "gdoi")
        )["groups"][0]
        assert len(ks_group["tek_spis"]) == 1
        now = time.time()
        sender_ids: dict[str, tuple[int, ...]] = {}
        for i, ep in enumerate(endpoints):
            sas = ep.engine.sadb.groups[GROUP]
            assert sas.kek is not None and sas.kek.spi.hex() == ks_group["kek_spi"]
            assert [f"{t.spi:08x}" for t in sas.active_teks(now)] == ks_group["tek_spis"]
            assert sas.sender_ids is not None and len(sas.sender_ids.values) >= 1
            sender_ids[gm_address(i)] = sas.sender_ids.values
        every_sid = [sid for values in sender_ids.values() for sid in values]
        assert len(set(every_sid)) == len(every_sid) >= GM_COUNT

        members = (
            await asyncio.to_thread(
                gdoictl_json, lab / "ks.sock", "show", "crypto", "gdoi", "ks", "members"
            )
        )["groups"][0]["members"]
        assert len(members) == GM_COUNT
        assert {m["address"] for m in members} == set(sender_ids)
        for m in members:
            assert tuple(m["sender_ids"]) == sender_ids[m["address"]]
        counters = await asyncio.to_thread(
            gdoictl_json, lab / "ks.sock", "show", "gdoid", "counters"
        )
        assert counters["registrations"] == GM_COUNT
        assert counters.get("registrations_failed", 0) == 0
        assert ks.proc.poll() is None
    assert "Traceback" not in ks.text()
