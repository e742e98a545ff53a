"""A real DNS server for the DNS endpoint-source tests: dnslib's DNSServer (UDP) answering from a
JSON file re-read on every query, so a test changes records by rewriting the file.

    python -m tests.dns_server ZONE.json PORT

ZONE.json: ``{"servfail": false, "records": {"NAME.": {"A": ["127.0.0.5"], "AAAA": [...],
"SRV": [[priority, weight, port, "target."]]}}}``. A name not listed answers NXDOMAIN; with
``servfail`` every query answers SERVFAIL (a failing lookup).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class ZoneFileResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        zone = json.loads(self.path.read_text())
        if zone.get("servfail"):
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name = str(request.q.qname)
        records = zone["records"].get(name)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        qtype = QTYPE[request.q.qtype]
        for value in records.get(qtype, []):
            if qtype == "A":
                rdata: object = A(value)
            elif qtype == "AAAA":
                rdata = AAAA(value)
            elif qtype == "SRV":
                priority, weight, port, target = value
                rdata = SRV(priority=priority, weight=weight, port=port, target=target)
            else:
                continue
            reply.add_answer(RR(name, getattr(QTYPE, qtype), rdata=rdata, ttl=1))
        return reply


def main() -> None:
    zone, port = Path(sys.argv[1]), int(sys.argv[2])
    server = DNSServer(ZoneFileResolver(zone), port=port, address="127.0.0.1", logger=DNSLogger("-request,-reply,-truncated"))
    server.start_thread()
    print(f"dns server on 127.0.0.1:{port}", flush=True)
    while server.isAlive():
        time.sleep(0.5)


if __name__ == "__main__":
    main()
