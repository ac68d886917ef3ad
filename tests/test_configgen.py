"""gdoid.configgen: what it renders is what tomllib (and so gdoid.config) reads back."""

from __future__ import annotations

import tomllib
from pathlib import Path

from gdoid.config.loader import parse_gm_config, parse_ks_config
from gdoid.configgen import (
    gm_config,
    gm_group,
    ks_config,
    ks_group,
    psk_auth,
    render_toml,
    sa_ipsec,
)
from gdoid.lab import export


def test_render_toml_round_trips_nested_tables_and_arrays() -> None:
    doc = {
        "ks": {
            "address": "127.0.0.1",
            "port": 848,
            "ratio": 0.5,
            "on": True,
            "quote": 'a "b" \\ c',
        },
        "auth": {
            "psk": [{"peer": "10.0.0.0/8", "key_file": "psk"}, {"peer": "::/0", "key_file": "x"}]
        },
        "group": [
            {
                "name": "GET",
                "servers": ["a", "b"],
                "kek": {"lifetime": 60},
                "sa_ipsec": [{"number": 1, "match": {"src": "10.0.0.0/8"}}],
            }
        ],
        "empty": {},
    }
    assert tomllib.loads(render_toml(doc, comment="two\nlines")) == doc


def test_none_values_are_left_out() -> None:
    assert tomllib.loads(render_toml({"gm": {"address": "10.0.0.1", "port": None}})) == {
        "gm": {"address": "10.0.0.1"}
    }


def test_builders_make_configs_the_parsers_accept(files: Path) -> None:
    ks = parse_ks_config(
        ks_config(
            "10.0.0.1",
            auth=psk_auth("10.0.0.0/8", "psk"),
            groups=[ks_group(sas=[sa_ipsec(1), sa_ipsec(2, transform="esp-cbc-128-sha256")])],
        ),
        files,
    )
    assert [g.number for g in ks.groups] == [1234]
    gm = parse_gm_config(
        gm_config("10.0.0.2", auth=psk_auth("10.0.0.0/8", "psk"), groups=[gm_group(["10.0.0.1"])]),
        files,
    )
    assert str(gm.address) == "10.0.0.2" and [g.number for g in gm.groups] == [1234]


def test_lab_export_writes_the_coop_peers_of_every_ks(tmp_path: Path) -> None:
    lab = export(tmp_path, gms=3, port=20848, kss=3)
    ks2 = tomllib.loads(lab.kss[1].read_text())
    assert ks2["coop"] == {
        "priority": 90,
        "announce_interval": 1.0,
        "peer": [
            {"address": "127.0.0.1", "port": 20848, "psk_file": "coop.psk"},
            {"address": "127.0.1.3", "port": 20848, "psk_file": "coop.psk"},
        ],
    }
    assert tomllib.loads(lab.gms[1].read_text())["group"][0]["servers"] == [
        "127.0.1.2",
        "127.0.1.3",
        "127.0.0.1",
    ]
