"""
The datagrams the kernel dropped at one UDP socket for want of room in its
receive buffer: the datagrams a gateway never saw.

Twisted's UDP port reads with C{recvfrom}, so the C{SO_RXQ_OVFL} count
(delivered as ancillary data by C{recvmsg}) is out of reach without
replacing the port; Linux keeps the same count per socket in the C{drops}
column of /proc/net/udp and /proc/net/udp6, on the line of the socket's
inode.
"""

from __future__ import annotations

import os
from pathlib import Path

TABLES = (Path("/proc/net/udp"), Path("/proc/net/udp6"))


def socket_inode(descriptor: int) -> int:
    return os.fstat(descriptor).st_ino


def receive_drops(inode: int, tables=TABLES) -> int | None:
    """
    The drops of the socket with C{inode}, or C{None} if no table lists it
    (not Linux, or /proc not mounted).
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
