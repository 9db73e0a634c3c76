"""
The datagrams the kernel dropped at one UDP socket for want of room in its
receive buffer: the datagrams a gateway never saw.

Twisted's UDP port reads with C{recvfrom}, so the C{SO_RXQ_OVFL} count
(delivered as ancillary data by C{recvmsg}) is out of reach without
replacing the port.  Linux keeps the same count per socket, and tells it
two ways:

- through its socket monitoring interface (C{NETLINK_SOCK_DIAG}, what
  C{ss} uses): the sockets of one local port, each with its memory figures
  (C{SK_MEMINFO_DROPS} among them), in binary, the kernel skipping every
  socket of another port.  A few hundred microseconds whatever the number
  of sockets on the host;
- in the C{drops} column of /proc/net/udp and /proc/net/udp6, on the line
  of the socket's inode: a text line for EVERY UDP socket of the host, which
  the reader pays for.  With the 20,000 sockets of a simulated fleet on the
  same host, a read took ~0.3 s of the gateway's CPU, on its reactor thread;
  it is kept for a kernel without the monitoring interface.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Callable

TABLES = (Path("/proc/net/udp"), Path("/proc/net/udp6"))

# From linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_SKMEMINFO = 7
SK_MEMINFO_DROPS = 8
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr
#: Where struct inet_diag_msg holds the inode, and its size (attributes follow).
_INODE_AT, _DIAG_MSG_SIZE = 68, 72
#: Messages a dump may take before the answer is given up on: a port has
#: one socket, or a few with SO_REUSEPORT.
_MOST_READS = 64


def socket_inode(descriptor: int) -> int:
    return os.fstat(descriptor).st_ino


def receive_drops(inode: int, tables=TABLES) -> int | None:
    """
    The drops of the socket with C{inode}, read from /proc's tables, or
    C{None} if no table lists it (not Linux, or /proc not mounted).
    """
    wanted = str(inode)
    for table in tables:
        try:
            with open(table) as f:
                lines = f.readlines()
        except OSError:
            continue
        # Each line ends "inode ref pointer drops"; the header's other
        # names do not match the columns one for one ("tx_queue rx_queue"
        # heads one column), so the fields are counted from the end.
        header = lines[0].split() if lines else []
        if header[-4:] != ["inode", "ref", "pointer", "drops"]:
            continue
        for line in lines[1:]:
            fields = line.split()
            if len(fields) >= 4 and fields[-4] == wanted:
                return int(fields[-1])
    return None


def diag_drops(family: int, port: int, inode: int) -> int | None:
    """
    The drops of the UDP socket of C{family} bound to local C{port} with
    C{inode}, asked of the kernel's socket monitoring interface; C{None}
    if it lists no such socket.  Raises L{OSError} if the interface cannot
    be used (not Linux, the module missing, not permitted).
    """
    # struct inet_diag_req_v2: family, protocol, the extensions wanted,
    # padding, the states (all); then struct inet_diag_sockid: the local
    # port (the kernel's filter), the remote port, the addresses, the
    # interface and the cookie (none).
    request = struct.pack("=BBBxI", family, socket.IPPROTO_UDP, 1 << (INET_DIAG_SKMEMINFO - 1), 0xFFFFFFFF)
    request += struct.pack("!HH", port, 0) + bytes(32) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as link:
        link.settimeout(1.0)
        link.send(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                  + request)
        found = None
        for _ in range(_MOST_READS):
            data = link.recv(65536)
            at = 0
            while at + _HEADER.size <= len(data):
                length, kind = _HEADER.unpack_from(data, at)[:2]
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, at + _HEADER.size)
                    raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
                body = at + _HEADER.size
                if length >= _HEADER.size + _DIAG_MSG_SIZE and struct.unpack_from("=I", data, body + _INODE_AT)[0] == inode:
                    found = _meminfo_drops(data, body + _DIAG_MSG_SIZE, at + length)
                if length < _HEADER.size:
                    raise OSError("sock_diag: a malformed answer")
                at += (length + 3) & ~3
        raise OSError("sock_diag: the answer did not end")


def _meminfo_drops(data: bytes, at: int, end: int) -> int | None:
    while at + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(data, at)
        if length < _ATTRIBUTE.size:
            return None
        if kind == INET_DIAG_SKMEMINFO and length >= _ATTRIBUTE.size + 4 * (SK_MEMINFO_DROPS + 1):
            return struct.unpack_from("=I", data, at + _ATTRIBUTE.size + 4 * SK_MEMINFO_DROPS)[0]
        at += (length + 3) & ~3
    return None


def socket_drops(
    descriptor: int, tables=TABLES, ask: Callable[[int, int, int], int | None] = diag_drops
) -> int | None:
    """
    The drops of the bound UDP socket C{descriptor}: asked of the kernel's
    socket monitoring interface, or read from /proc's tables where that
    interface cannot be used; C{None} if neither knows the socket.
    """
    inode = socket_inode(descriptor)
    # A duplicate of the descriptor, closed here, to read its family and
    # address (both found by the kernel from the descriptor).
    with socket.socket(fileno=os.dup(descriptor)) as view:
        family, port = view.family, view.getsockname()[1]
    try:
        return ask(family, port, inode)
    except OSError:
        return receive_drops(inode, tables)
