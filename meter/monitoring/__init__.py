"""
What an operator watches: each daemon's HTTP monitoring endpoint
(L{web}: C{/metrics}, C{/healthz}, C{/readyz}), the Prometheus registry
around a role's collector (L{exposition}), the histogram value the roles
observe into (L{histogram}) and the kernel's drops at a UDP socket
(L{udp}).

The roles count into plain attributes of their metrics objects; nothing
here runs on their per-datagram path.  A role's collector (in
C{meter/gateway/exposition.py}, C{meter/cloud/exposition.py}) reads those
objects when Prometheus scrapes, on the reactor thread.
"""
