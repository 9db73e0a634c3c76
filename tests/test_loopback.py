"""
Settings meant for loopback only are refused beyond it, unless an override
key says otherwise: a cloud in plain text, and a cloud or gateway creating
the suite's secrets, listening on an address other hosts can reach.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meter import config, loopback

PLAIN = (
    "listens on {where}, beyond loopback, with [cloud] tls = false: gateways' readings would cross the network "
    "in plain text; set tls = true, or [cloud] allow_plain_beyond_loopback = true if the network is closed by "
    "other means"
)
GENERATE = (
    "listens on {where}, beyond loopback, with [security] generate = true: a host with an empty secrets folder "
    "would make a CA and keys no other host holds; provision the hosts (`meter certs`, docs/security.md) and set "
    "generate = false, or [security] allow_generate_beyond_loopback = true"
)


def settings(**sections) -> config.Config:
    return config.from_raw(sections, "test.toml")


@pytest.mark.parametrize(
    "host, loopback_",
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False),
     ("::", False), ("", False), ("10.10.10.2", False), ("fd00::1", False)],
)
def test_what_is_loopback(host, loopback_):
    assert loopback.is_loopback(host) is loopback_


@pytest.mark.parametrize(
    "listen, where",
    [("tcp:8001:interface=0.0.0.0", "every address"), ("tcp:8001", "every address"),
     ("tcp6:8001:interface=\\:\\:", "every address"), ("tcp:8001:interface=10.10.10.2", "10.10.10.2")],
)
def test_a_plain_text_cloud_beyond_loopback_is_refused(listen, where):
    plain = {"listen": listen, "tls": False}
    assert loopback.refusal("cloud", settings(cloud=plain, security={"generate": False})) == (
        f"[cloud] listen {listen} " + PLAIN.format(where=where)
    )
    allowed = {**plain, "allow_plain_beyond_loopback": True}
    assert loopback.refusal("cloud", settings(cloud=allowed, security={"generate": False})) is None


def test_a_cloud_creating_secrets_beyond_loopback_is_refused():
    listen = "tcp:8001:interface=10.10.10.2"
    assert loopback.refusal("cloud", settings(cloud={"listen": listen})) == (
        f"[cloud] listen {listen} " + GENERATE.format(where="10.10.10.2")
    )
    override = {"allow_generate_beyond_loopback": True}
    assert loopback.refusal("cloud", settings(cloud={"listen": listen}, security=override)) is None
    assert loopback.refusal("cloud", settings(cloud={"listen": listen}, security={"generate": False})) is None


def test_a_gateway_creating_secrets_beyond_loopback_is_refused():
    assert loopback.refusal("gateway", settings(gateway={"listen": "192.168.1.1:10005"})) == (
        "[gateway] listen 192.168.1.1:10005 " + GENERATE.format(where="192.168.1.1")
    )
    assert loopback.refusal("gateway", settings(gateway={"listen": "[::]:10005"})).startswith(
        "[gateway] listen :::10005 listens on every address"
    )
    override = {"allow_generate_beyond_loopback": True}
    assert loopback.refusal("gateway", settings(gateway={"listen": "192.168.1.1:10005"}, security=override)) is None


def test_loopback_and_unix_sockets_and_devices_pass():
    assert loopback.refusal("cloud", settings(cloud={"tls": False})) is None  # the defaults: 127.0.0.1
    assert loopback.refusal("cloud", settings(cloud={"listen": "tcp:8001:interface=\\:\\:1", "tls": False})) is None
    assert loopback.refusal("cloud", settings(cloud={"listen": "unix:/run/meter/cloud.sock", "tls": False})) is None
    assert loopback.refusal("gateway", settings(gateway={"listen": "[::1]:10005"})) is None
    assert loopback.refusal("device", settings(gateway={"listen": "0.0.0.0:10005"})) is None


def test_a_device_creating_secrets_with_its_gateway_on_another_host_is_refused():
    # It would make a key of its own, which its gateway does not hold.
    assert loopback.refusal("device", settings(device={"gateway": "192.168.1.1:10005"})) == (
        "[device] gateway 192.168.1.1:10005 is on 192.168.1.1, beyond loopback, with [security] generate = true: "
        "a host with an empty secrets folder would make a CA and keys no other host holds; provision the hosts "
        "(`meter certs`, docs/security.md) and set generate = false, or [security] allow_generate_beyond_loopback = true"
    )
    override = {"allow_generate_beyond_loopback": True}
    assert loopback.refusal("device", settings(device={"gateway": "192.168.1.1:10005"}, security=override)) is None


def test_the_repository_configuration_is_loopback_only():
    repository = config.load(Path(__file__).resolve().parent.parent / "etc" / "meter.toml")
    assert loopback.refusal("cloud", repository) is None
    assert loopback.refusal("gateway", repository) is None


@pytest.mark.e2e
def test_the_daemons_refuse_to_start_in_one_line_before_making_secrets(make_suite):
    suite = make_suite(2, cloud={"tls": False})
    listen = f"tcp:{suite.cloud_port}:interface=0.0.0.0"
    cloud = suite.start("cloud", "meter-cloud", "--listen", listen)
    assert cloud.wait(30) != 0
    assert cloud.lines == [f"meter-cloud: [cloud] listen {listen} " + PLAIN.format(where="every address")]
    gateway = suite.start("gateway", "meter-gateway", "--listen", f"0.0.0.0:{suite.gateway_port}")
    assert gateway.wait(30) != 0
    assert gateway.lines == [
        f"meter-gateway: [gateway] listen 0.0.0.0:{suite.gateway_port} " + GENERATE.format(where="every address")
    ]
    assert not (suite.root / "var" / "secrets").exists()
    assert not suite.db.exists() and not suite.spool.exists()


@pytest.mark.parametrize(
    "web, where",
    [("tcp:8080:interface=0.0.0.0", "every address"), ("tcp:8080", "every address"),
     ("tcp:8080:interface=10.10.10.2", "10.10.10.2")],
)
def test_the_web_service_beyond_loopback_needs_a_token(web, where, tmp_path):
    refused = loopback.refusal("cloud", settings(cloud={"web": web}))
    assert refused == (
        f"[cloud] web {web} listens on {where}, beyond loopback, without a token: anyone who reaches it would read "
        f"the fleet's readings; set [cloud] web_token_file to a file holding a token (docs/api.md), or listen on "
        f"127.0.0.1"
    )
    token = tmp_path / "token"
    assert loopback.refusal("cloud", settings(cloud={"web": web, "web_token_file": str(token)})) is None
    # Off, or on loopback: nothing asked.
    assert loopback.refusal("cloud", settings(cloud={"web": ""})) is None
    assert loopback.refusal("cloud", settings(cloud={"web": "tcp:8080:interface=127.0.0.1"})) is None
    assert loopback.refusal("cloud", settings(cloud={"web": "tcp6:8080:interface=\\:\\:1"})) is None
