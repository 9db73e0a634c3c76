"""
Settings meant for loopback only, refused beyond it: a cloud taking gateways
in plain text (C{[cloud] tls = false}), and a daemon creating the suite's
secrets at start (C{[security] generate = true}), while it listens on an
address other hosts can reach (a device: while its gateway is on another
host; it would make a key of its own, which its gateway does not hold).  Each has an explicit override key, for a
network that is closed by other means (the lab's network namespaces).
The cloud's web service beyond loopback needs a token
(C{[cloud] web_token_file}), and has no override: its readers are people,
whom a closed network does not tell apart.

"Beyond loopback": any listen address outside 127.0.0.0/8 and ::1,
including every address at once (C{0.0.0.0}, C{::}, an endpoint without
C{interface=}), and an endpoint whose address cannot be told (a socket
handed over by systemd).  A Unix socket is not a network address.
"""

from __future__ import annotations

import ipaddress

from meter import config


def is_loopback(host: str) -> bool:
    """
    Whether C{host} (an IP address; C{""} for every address) is on loopback.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def endpoint_host(description: str) -> str | None:
    """
    The address a Twisted server endpoint description listens on (C{""}:
    every address, or one that cannot be told), or None for a Unix socket.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString

    endpoint = serverFromString(reactor, description)
    if isinstance(endpoint, UNIXServerEndpoint):
        return None
    return getattr(endpoint, "_interface", "")


def _where(host: str) -> str:
    return "every address" if host in ("", "0.0.0.0", "::") else host


def refusal(role: str, settings: config.Config) -> str | None:
    """
    Why C{role} ("cloud", "gateway", "device") must not start with
    C{settings}, naming the keys and the override, or None.
    """
    if role == "cloud":
        web = settings.cloud["web"]
        web_host = endpoint_host(web) if web else None
        if web_host is not None and not is_loopback(web_host) and settings.cloud["web_token_file"] is None:
            return (
                f"[cloud] web {web} listens on {_where(web_host)}, beyond loopback, without a token: anyone who "
                f"reaches it would read the fleet's readings; set [cloud] web_token_file to a file holding a token "
                f"(docs/api.md), or listen on 127.0.0.1"
            )
        listen = settings.cloud["listen"]
        host = endpoint_host(listen)
        key = "[cloud] listen"
    elif role == "gateway":
        host, port = settings.gateway["listen"]
        listen = f"{host}:{port}"
        key = "[gateway] listen"
    else:
        host, port = settings.device["gateway"]
        listen = f"{host}:{port}"
        key = "[device] gateway"
    if host is None or is_loopback(host):
        return None
    verb = "is on" if role == "device" else "listens on"
    if role == "cloud" and not settings.cloud["tls"] and not settings.cloud["allow_plain_beyond_loopback"]:
        return (
            f"{key} {listen} {verb} {_where(host)}, beyond loopback, with [cloud] tls = false: gateways' "
            f"readings would cross the network in plain text; set tls = true, or "
            f"[cloud] allow_plain_beyond_loopback = true if the network is closed by other means"
        )
    security = settings.security
    if security["generate"] and not security["allow_generate_beyond_loopback"]:
        return (
            f"{key} {listen} {verb} {_where(host)}, beyond loopback, with [security] generate = true: a host "
            f"with an empty secrets folder would make a CA and keys no other host holds; provision the hosts (`meter certs`, docs/security.md) "
            f"and set generate = false, or [security] allow_generate_beyond_loopback = true"
        )
    return None
