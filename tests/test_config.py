"""Tests for gdoid.config (loader, schemas, model): TOML → validated frozen dataclasses."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from gdoid.config.errors import ConfigError
from gdoid.config.loader import load_gm_config, load_ks_config, parse_gm_config, parse_ks_config
from gdoid.config.model import (
    DEFAULT_SOFTWARE_VERSION,
    AuthConfig,
    CoopConfig,
    CoopPeer,
    GmConfig,
    GmGroupConfig,
    IkeCipher,
    IkeHash,
    IkePolicy,
    KekConfig,
    KsConfig,
    KsGroupConfig,
    PkiConfig,
    PskEntry,
    RekeyPolicy,
    SaIpsec,
    TrafficSelectorConfig,
)
from gdoid.protocol.crypto import SigHash
from gdoid.protocol.transforms import SIG_HASHES, TEK_TRANSFORMS
from gdoid.protocol.version import SoftwareVersion

KS_TOML = """\
[ks]
address = "10.0.8.1"
port = 848
software_version = "1.0.2"
control_socket = "run/ks.sock"
state_dir = "/var/lib/gdoid/ks"
keylog_dir = "keylog"
max_half_open = 4096

[ike]
ciphers = ["aes-cbc-256", "aes-cbc-128"]
hashes = ["sha256", "sha384"]
dh_groups = [19, 14, 20]
lifetime = 86400
allow_sha1 = false
retransmit_interval = 2.0
retransmit_count = 4

[[auth.psk]]
peer = "10.0.0.0/8"
key_file = "psk.secret"

[[auth.psk]]
peer = "10.0.0.0/24"
key_file = "psk-lab.secret"

[auth.pki]
ca_file = "ca.pem"
cert_file = "ks.pem"
key_file = "ks.key"
crl_file = "crl.pem"
deny = ["gm3"]

[[group]]
name = "GET"
number = 1234
sender_id_bits = 8
activation_delay = 0
deactivation_delay = 0
[group.kek]
algorithm = "aes-cbc-256"
lifetime = 86400
signing_key = "rekey.key"
sig_hash = "sha256"
[group.rekey]
lead_time = 90
retransmit_interval = 10
retransmit_count = 2
max_missed = 3
[[group.sa_ipsec]]
number = 1
profile = "gdoi-p"
transform = "esp-gcm-256"
lifetime = 3600
replay_window = 64
tbar_window_ms = 5000
receive_only = false
[group.sa_ipsec.match]
src = "10.1.0.0/16"
dst = "10.2.0.0/16"
protocol = "any"
[[group.sa_ipsec]]
number = 2
profile = "gdoi-p2"
transform = "esp-cbc-128-sha256"
lifetime = 1800
[group.sa_ipsec.match]
src = "10.3.0.0/16"
dst = "10.4.0.0/16"
protocol = "udp"
dst_port = 5060

[coop]
priority = 100
announce_interval = 30.0
[[coop.peer]]
address = "10.0.9.1"
psk_file = "coop.secret"
"""

GM_TOML = """\
[gm]
address = "10.0.0.2"
port = 848
software_version = "1.0.1"
control_socket = "/run/gdoid/gm.sock"
fail_close = true
registration_timeout = 5
rereg_jitter = 0.2
tun_name = "gdoi1"

[[auth.psk]]
peer = "10.0.8.0/24"
key_file = "psk.secret"

[[group]]
name = "GET"
number = 1234
servers = ["10.0.8.1", "10.0.9.1"]
server_port = 848
"""


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A directory holding every file the sample configs refer to."""
    _write(tmp_path / "psk.secret", b"s3cret-key\n")
    _write(tmp_path / "psk-lab.secret", b"lab-key")
    _write(tmp_path / "coop.secret", b"ks-pair-key\n")
    _write(tmp_path / "rekey.key", b"-----BEGIN PRIVATE KEY-----\n")
    _write(tmp_path / "ks.key", b"-----BEGIN PRIVATE KEY-----\n")
    for name in ("ca.pem", "ks.pem", "crl.pem"):
        _write(tmp_path / name, b"-----BEGIN CERTIFICATE-----\n", 0o644)
    return tmp_path


def _ks_err(text: str, base: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_ks_config(text, base)
    return info.value


def _gm_err(text: str, base: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_gm_config(text, base)
    return info.value


# ---------------------------------------------------------------- valid configs


def test_full_ks_config(confdir: Path) -> None:
    cfg = parse_ks_config(KS_TOML, confdir)
    expected = KsConfig(
        address=IPv4Address("10.0.8.1"),
        port=848,
        software_version=SoftwareVersion(1, 0, 2),
        control_socket=confdir / "run/ks.sock",
        state_dir=Path("/var/lib/gdoid/ks"),
        keylog_dir=confdir / "keylog",
        max_half_open=4096,
        ike=IkePolicy(),
        auth=AuthConfig(
            psks=(
                PskEntry(IPv4Network("10.0.0.0/8"), b"s3cret-key"),
                PskEntry(IPv4Network("10.0.0.0/24"), b"lab-key"),
            ),
            pki=PkiConfig(
                ca_file=confdir / "ca.pem",
                cert_file=confdir / "ks.pem",
                key_file=confdir / "ks.key",
                crl_file=confdir / "crl.pem",
                deny=("gm3",),
            ),
        ),
        groups=(
            KsGroupConfig(
                name="GET",
                number=1234,
                kek=KekConfig(
                    algorithm=IkeCipher.AES_CBC_256,
                    lifetime=86400,
                    signing_key=confdir / "rekey.key",
                    sig_hash=SigHash.SHA256,
                ),
                sa_ipsec=(
                    SaIpsec(
                        number=1,
                        profile="gdoi-p",
                        transform=TEK_TRANSFORMS["esp-gcm-256"],
                        lifetime=3600,
                        match=TrafficSelectorConfig(
                            IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16")
                        ),
                        replay_window=64,
                        tbar_window_ms=5000,
                    ),
                    SaIpsec(
                        number=2,
                        profile="gdoi-p2",
                        transform=TEK_TRANSFORMS["esp-cbc-128-sha256"],
                        lifetime=1800,
                        match=TrafficSelectorConfig(
                            IPv4Network("10.3.0.0/16"),
                            IPv4Network("10.4.0.0/16"),
                            protocol=17,
                            dst_port=5060,
                        ),
                    ),
                ),
                rekey=RekeyPolicy(),
            ),
        ),
        coop=CoopConfig(
            priority=100, peers=(CoopPeer(IPv4Address("10.0.9.1"), psk=b"ks-pair-key"),)
        ),
    )
    assert cfg == expected
    assert isinstance(cfg.groups[0].rekey.retransmit_interval, float)
    assert cfg.group_by_number(1234) is cfg.groups[0]
    assert cfg.group_by_name("GET") is cfg.groups[0]
    assert cfg.group_by_number(1) is None
    assert cfg.group_by_name("nope") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]  # assigning a frozen field on purpose


def test_full_gm_config(confdir: Path) -> None:
    cfg = parse_gm_config(GM_TOML, confdir)
    assert cfg == GmConfig(
        address=IPv4Address("10.0.0.2"),
        software_version=SoftwareVersion(1, 0, 1),
        fail_close=True,
        registration_timeout=5.0,
        rereg_jitter=0.2,
        tun_name="gdoi1",
        auth=AuthConfig(psks=(PskEntry(IPv4Network("10.0.8.0/24"), b"s3cret-key"),)),
        groups=(
            GmGroupConfig(
                name="GET",
                number=1234,
                servers=(IPv4Address("10.0.8.1"), IPv4Address("10.0.9.1")),
            ),
        ),
    )
    assert cfg.control_socket == Path("/run/gdoid/gm.sock")
    assert cfg.keylog_dir is None


def test_minimal_ks_defaults(confdir: Path) -> None:
    cfg = parse_ks_config(
        """
        [ks]
        address = "10.0.8.1"
        [[auth.psk]]
        peer = "0.0.0.0/0"
        key_file = "psk.secret"
        [[group]]
        name = "G"
        number = 1
        [group.kek]
        signing_key = "rekey.key"
        [[group.sa_ipsec]]
        number = 1
        profile = "p"
        transform = "esp-gcm-128"
        lifetime = 600
        match = { src = "10.1.0.0/16", dst = "10.2.0.0/16" }
        """,
        confdir,
    )
    assert cfg.port == 848
    assert cfg.software_version == DEFAULT_SOFTWARE_VERSION == SoftwareVersion(1, 0, 2)
    assert cfg.control_socket == Path("/run/gdoid/ks.sock")
    assert cfg.ike == IkePolicy()
    assert cfg.coop is None
    group = cfg.groups[0]
    assert group.kek.algorithm is IkeCipher.AES_CBC_256
    assert group.rekey == RekeyPolicy()
    assert group.sa_ipsec[0].replay_window is None
    assert group.sa_ipsec[0].tbar_window_ms is None
    assert group.sa_ipsec[0].match.protocol == 0


def test_load_from_file_resolves_relative_paths(confdir: Path) -> None:
    (confdir / "ks.toml").write_text(KS_TOML)
    (confdir / "gm.toml").write_text(GM_TOML)
    ks = load_ks_config(confdir / "ks.toml")
    assert ks.auth.psks[0].key == b"s3cret-key"
    assert ks.groups[0].kek.signing_key == confdir / "rekey.key"
    assert ks.auth.pki is not None and ks.auth.pki.ca_file == confdir / "ca.pem"
    assert ks.control_socket == confdir / "run" / "ks.sock"
    assert ks.state_dir == Path("/var/lib/gdoid/ks")  # absolute stays absolute
    gm = load_gm_config(confdir / "gm.toml")
    assert gm.auth.psk_for(IPv4Address("10.0.8.1")) == b"s3cret-key"


def test_load_names_the_file(confdir: Path) -> None:
    path = confdir / "ks.toml"
    path.write_text(KS_TOML.replace("max_half_open = 4096", "max_half_opne = 4096"))
    with pytest.raises(ConfigError) as info:
        load_ks_config(path)
    assert str(info.value).startswith(f"{path}: ks.max_half_opne: unknown key")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_gm_config(tmp_path / "absent.toml")


# ---------------------------------------------------------------- helpers


def test_psk_for_longest_prefix() -> None:
    auth = AuthConfig(
        psks=(
            PskEntry(IPv4Network("0.0.0.0/0"), b"default"),
            PskEntry(IPv4Network("10.0.0.0/24"), b"lab"),
            PskEntry(IPv4Network("10.0.0.0/8"), b"corp"),
            PskEntry(IPv4Network("10.0.0.7/32"), b"host"),
        )
    )
    assert auth.psk_for(IPv4Address("10.0.0.7")) == b"host"
    assert auth.psk_for(IPv4Address("10.0.0.8")) == b"lab"
    assert auth.psk_for(IPv4Address("10.9.0.1")) == b"corp"
    assert auth.psk_for(IPv4Address("192.0.2.1")) == b"default"
    assert AuthConfig(psks=auth.psks[1:]).psk_for(IPv4Address("192.0.2.1")) is None


def test_psk_repr_hides_key() -> None:
    entry = PskEntry(IPv4Network("10.0.0.0/8"), b"topsecret")
    assert "topsecret" not in repr(entry)
    assert "topsecret" not in repr(AuthConfig(psks=(entry,)))


def test_software_version() -> None:
    v = SoftwareVersion.parse("1.0.2")
    assert v == (1, 0, 2) and str(v) == "1.0.2"
    assert v > SoftwareVersion(1, 0, 1)
    for bad in ("1.0", "1.0.2.3", "a.b.c", "1.0.256", " 1.0.2", ""):
        with pytest.raises(ValueError):
            SoftwareVersion.parse(bad)


def test_error_str_format() -> None:
    err = ConfigError("group[0].sa_ipsec[1].lifetime", "must be an integer", file="ks.toml")
    assert str(err) == "ks.toml: group[0].sa_ipsec[1].lifetime: must be an integer"
    assert err.key_path == "group[0].sa_ipsec[1].lifetime"


# ---------------------------------------------------------------- errors


def test_unknown_key(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace("lifetime = 3600", "lifetme = 3600"), confdir)
    assert err.key_path == "group[0].sa_ipsec[0].lifetme"
    assert "unknown key" in str(err) and "'lifetime'" in str(err)


def test_unknown_top_level_table(confdir: Path) -> None:
    err = _gm_err(GM_TOML + "\n[gorup]\nx = 1\n", confdir)
    assert err.key_path == "gorup"


def test_wrong_type(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace("port = 848", 'port = "848"', 1), confdir)
    assert err.key_path == "ks.port"
    err = _gm_err(GM_TOML.replace("fail_close = true", "fail_close = 1"), confdir)
    assert str(err) == "gm.toml: gm.fail_close: must be true or false"
    err = _ks_err(KS_TOML.replace("sender_id_bits = 8", "sender_id_bits = true"), confdir)
    assert err.key_path == "group[0].sender_id_bits"  # TOML bool is not an integer
    err = _ks_err(KS_TOML.replace('deny = ["gm3"]', 'deny = "gm3"'), confdir)
    assert err.key_path == "auth.pki.deny"


def test_lifetime_out_of_range(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace("lifetime = 1800", "lifetime = 19"), confdir)
    assert str(err) == (
        "ks.toml: group[0].sa_ipsec[1].lifetime: must be an integer between 20 and 86400"
    )
    err = _ks_err(KS_TOML.replace("lifetime = 1800", "lifetime = 1800.0"), confdir)
    assert err.key_path == "group[0].sa_ipsec[1].lifetime"


def test_sha1_requires_allow_sha1(confdir: Path) -> None:
    text = KS_TOML.replace('hashes = ["sha256", "sha384"]', 'hashes = ["sha256", "sha1"]')
    err = _ks_err(text, confdir)
    assert err.key_path == "ike.hashes[1]" and "allow_sha1" in err.message
    cfg = parse_ks_config(text.replace("allow_sha1 = false", "allow_sha1 = true"), confdir)
    assert cfg.ike.hashes == (IkeHash.SHA256, IkeHash.SHA1)


def test_bad_dh_group(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace("dh_groups = [19, 14, 20]", "dh_groups = [19, 2]"), confdir)
    assert err.key_path == "ike.dh_groups[1]"


def test_duplicate_sa_ipsec_number(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace("number = 2\n", "number = 1\n"), confdir)
    assert err.key_path == "group[0].sa_ipsec[1].number"
    assert "duplicate" in err.message and "group[0].sa_ipsec[0].number" in err.message


def test_duplicate_group(confdir: Path) -> None:
    group = KS_TOML[KS_TOML.index("[[group]]") : KS_TOML.index("[coop]")]
    err = _ks_err(KS_TOML + "\n" + group.replace('name = "GET"', 'name = "GET2"'), confdir)
    assert err.key_path == "group[1].number"
    err = _ks_err(KS_TOML + "\n" + group.replace("number = 1234", "number = 99"), confdir)
    assert err.key_path == "group[1].name"


def test_world_readable_psk_file(confdir: Path) -> None:
    (confdir / "psk.secret").chmod(0o644)
    err = _ks_err(KS_TOML, confdir)
    assert err.key_path == "auth.psk[0].key_file"
    assert str(confdir / "psk.secret") in err.message and "0644" in err.message


def test_psk_identity_is_an_address_or_a_plain_dns_name(confdir: Path) -> None:
    """The ID_FQDN a NAT'd peer may send is compared as it is: a wildcard would never match."""
    with_identity = 'key_file = "psk.secret"\nidentity = "{}"\n'

    def gm(identity: str) -> str:
        return GM_TOML.replace('key_file = "psk.secret"\n', with_identity.format(identity))

    cfg = parse_gm_config(gm("GM1.Example.com."), confdir)
    assert cfg.auth.psks[0].identity == "gm1.example.com"
    assert parse_gm_config(gm(" 192.168.1.5 "), confdir).auth.psks[0].identity == "192.168.1.5"
    for bad in ("*.example.com", "gm*.example.com", "-gm.example.com", "gm_1.example.com"):
        err = _gm_err(gm(bad), confdir)
        assert err.key_path == "auth.psk[0].identity", bad
        assert "IPv4 address (ID_IPV4_ADDR) or a DNS name (ID_FQDN)" in err.message


def test_group_readable_signing_key(confdir: Path) -> None:
    (confdir / "rekey.key").chmod(0o640)
    err = _ks_err(KS_TOML, confdir)
    assert err.key_path == "group[0].kek.signing_key" and "0640" in err.message


def test_missing_signing_key(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace('signing_key = "rekey.key"\n', ""), confdir)
    assert err.key_path == "group[0].kek.signing_key"
    assert "missing" in err.message
    (confdir / "rekey.key").unlink()
    err = _ks_err(KS_TOML, confdir)
    assert err.key_path == "group[0].kek.signing_key"
    assert "not found" in err.message


def test_missing_ca_file(confdir: Path) -> None:
    (confdir / "crl.pem").unlink()
    assert _ks_err(KS_TOML, confdir).key_path == "auth.pki.crl_file"


def test_bad_prefix(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace('src = "10.1.0.0/16"', 'src = "10.1.0.0/33"'), confdir)
    assert err.key_path == "group[0].sa_ipsec[0].match.src"
    # Host bits set: refused rather than silently masked.
    err = _ks_err(KS_TOML.replace('peer = "10.0.0.0/8"', 'peer = "10.0.0.1/8"'), confdir)
    assert err.key_path == "auth.psk[0].peer"


def test_bad_software_version(confdir: Path) -> None:
    err = _gm_err(GM_TOML.replace('"1.0.1"', '"1.0"'), confdir)
    assert err.key_path == "gm.software_version"
    err = _ks_err(KS_TOML.replace('"1.0.2"', '"1.0.x"'), confdir)
    assert err.key_path == "ks.software_version"


def test_bad_address(confdir: Path) -> None:
    err = _gm_err(GM_TOML.replace('"10.0.9.1"', '"10.0.9.300"'), confdir)
    assert err.key_path == "group[0].servers[1]"


def test_lead_time_vs_lifetime(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace("lead_time = 90", "lead_time = 1800"), confdir)
    assert err.key_path == "group[0].rekey.lead_time"


def test_ports_need_tcp_or_udp(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace('protocol = "udp"', 'protocol = "icmp"'), confdir)
    assert err.key_path == "group[0].sa_ipsec[1].match.dst_port"


def test_auth_required(confdir: Path) -> None:
    text = GM_TOML.replace('[[auth.psk]]\npeer = "10.0.8.0/24"\nkey_file = "psk.secret"\n', "")
    assert _gm_err(text, confdir).key_path == "auth"
    assert _gm_err(text + "[auth]\n", confdir).key_path == "auth"


def test_no_sa_ipsec(confdir: Path) -> None:
    start = KS_TOML.index("[[group.sa_ipsec]]")
    text = KS_TOML[:start] + KS_TOML[KS_TOML.index("[coop]") :]
    assert _ks_err(text, confdir).key_path == "group[0].sa_ipsec"


def test_invalid_toml(confdir: Path) -> None:
    err = _gm_err("[gm\n", confdir)
    assert str(err).startswith("gm.toml: invalid TOML")


def test_transform_and_sig_hash_names_are_the_protocol_tables(confdir: Path) -> None:
    """config, the KS and docs/config.md share gdoid/protocol/transforms.py's tables."""
    for name, transform in TEK_TRANSFORMS.items():
        cfg = parse_ks_config(KS_TOML.replace('"esp-gcm-256"', f'"{name}"'), confdir)
        assert cfg.groups[0].sa_ipsec[0].transform is transform
    for name, sig_hash in SIG_HASHES.items():
        cfg = parse_ks_config(
            KS_TOML.replace('sig_hash = "sha256"', f'sig_hash = "{name}"'), confdir
        )
        assert cfg.groups[0].kek.sig_hash is sig_hash
    err = _ks_err(KS_TOML.replace('"esp-gcm-256"', '"esp-gcm-192"'), confdir)
    assert err.key_path == "group[0].sa_ipsec[0].transform"
    assert err.message == "must be one of " + ", ".join(repr(n) for n in TEK_TRANSFORMS)
    err = _ks_err(KS_TOML.replace('sig_hash = "sha256"', 'sig_hash = "sha1"'), confdir)
    assert err.message == "must be one of " + ", ".join(repr(n) for n in SIG_HASHES)
    docs = (Path(__file__).parent.parent / "docs" / "config.md").read_text(encoding="utf-8")
    assert (
        f"| `transform` | string | *required* | {', '.join(f'`{n}`' for n in TEK_TRANSFORMS)} |"
        in docs
    )
    assert (
        f'| `sig_hash` | string | `"sha256"` | {", ".join(f"`{n}`" for n in SIG_HASHES)} |' in docs
    )


# ---------------------------------------------------------------- IPv6 (issue 11 §3)
def test_match_accepts_ipv6_prefixes(confdir: Path) -> None:
    text = KS_TOML.replace('src = "10.1.0.0/16"', 'src = "fd00:1::/48"').replace(
        'dst = "10.2.0.0/16"', 'dst = "fd00:2::/48"'
    )
    match = parse_ks_config(text, confdir).groups[0].sa_ipsec[0].match
    assert (match.src, match.dst) == (IPv6Network("fd00:1::/48"), IPv6Network("fd00:2::/48"))


def test_match_refuses_mixed_families(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace('src = "10.1.0.0/16"', 'src = "fd00:1::/48"'), confdir)
    assert err.key_path == "group[0].sa_ipsec[0].match.dst"
    assert "IPv4" in str(err) and "IPv6" in str(err)


def test_match_ipv6_prefix_with_host_bits_is_refused(confdir: Path) -> None:
    err = _ks_err(KS_TOML.replace('src = "10.1.0.0/16"', 'src = "fd00:1::1/48"'), confdir)
    assert err.key_path == "group[0].sa_ipsec[0].match.src"


def test_dataplane_icmp6_source(confdir: Path) -> None:
    text = GM_TOML + '\n[dataplane]\nenabled = true\nicmp6_source = "fd00:1::fe"\n'
    assert parse_gm_config(text, confdir).dataplane.icmp6_source == IPv6Address("fd00:1::fe")
    assert parse_gm_config(GM_TOML, confdir).dataplane.icmp6_source is None
    for bad in ('"10.0.0.1"', '"ff02::1"', '"::"', "7"):
        err = _gm_err(GM_TOML + f"\n[dataplane]\nicmp6_source = {bad}\n", confdir)
        assert err.key_path == "dataplane.icmp6_source"


def test_gm_daemon_hands_icmp6_source_to_the_dataplane(confdir: Path) -> None:
    from gdoid.groupmember.daemon import GroupMemberDaemon

    text = GM_TOML + '\n[dataplane]\nenabled = true\nicmp6_source = "fd00:1::fe"\n'
    daemon = GroupMemberDaemon(parse_gm_config(text, confdir))
    assert daemon.dataplane is not None
    assert daemon.dataplane.icmp6_source == IPv6Address("fd00:1::fe").packed


def test_replay_time_window_size_is_ios_seconds(confdir: Path) -> None:
    """IOS ``replay time window-size 5`` (seconds) is the TBAR window; tbar_window_ms still works."""
    cfg = parse_ks_config(
        KS_TOML.replace("tbar_window_ms = 5000", "replay_time_window_size = 5"), confdir
    )
    assert cfg.groups[0].sa_ipsec[0].tbar_window_ms == 5000
    assert parse_ks_config(KS_TOML, confdir).groups[0].sa_ipsec[0].tbar_window_ms == 5000
    both = KS_TOML.replace(
        "tbar_window_ms = 5000", "tbar_window_ms = 5000\nreplay_time_window_size = 5"
    )
    err = _ks_err(both, confdir)
    assert err.key_path == "group[0].sa_ipsec[0].replay_time_window_size"
    err = _ks_err(
        KS_TOML.replace("tbar_window_ms = 5000", "replay_time_window_size = 101"), confdir
    )
    assert str(err) == (
        "ks.toml: group[0].sa_ipsec[0].replay_time_window_size: must be an integer between 1 and 100"
    )
