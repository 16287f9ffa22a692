#!/usr/bin/env python3
"""Time the daemon's dashboard pages over HTTP, as a browser fetches them.

    dashboard_bench.py --url http://127.0.0.1:9090 [--runs 20] [--token-env VAR]

Point it at a running `dotmac-gitops daemon` (for the README's figure: a release build on the
10,000-tenant repository of `bench/peer/gen_repo.py --tenants 10000 --git`, report-only, once
/readyz answers 200). For each page it prints the tenant count, then the median and the
slowest of --runs requests (time to the last byte) and the size of the answer. Only the
standard library; nothing is changed on the daemon (every request is a GET).
"""
import argparse
import json
import os
import statistics
import time
import urllib.request

PAGES = [
    "/",
    "/?sort=status",
    "/?sort=name&page=50",
    "/?status=Synced",
    "/?per=1000",
    "/audit",
]


def fetch(url, headers):
    req = urllib.request.Request(url, headers=headers)
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        body = r.read()
        status = r.status
    return status, body, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:9090")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--token-env", help="the variable holding the daemon's --auth-token-env token")
    a = ap.parse_args()
    headers = {}
    if a.token_env:
        headers["Authorization"] = "Bearer " + os.environ[a.token_env]
    base = a.url.rstrip("/")
    _, body, _ = fetch(base + "/api/v1/status", headers)
    status = json.loads(body)
    tenants = status["tenants"]
    print(f"{len(tenants):,} tenants; {json.dumps(status.get('summary', {}))}")
    pages = list(PAGES)
    if tenants:
        middle = tenants[len(tenants) // 2]["tenant"]
        # A search that matches a handful of ids, and that tenant's page.
        pages += [f"/?q={middle[:-2]}", f"/tenants/{middle}"]
    for page in pages:
        times = []
        size = 0
        for _ in range(a.runs):
            code, body, took = fetch(base + page, headers)
            if code != 200:
                raise SystemExit(f"GET {page}: HTTP {code}")
            times.append(took)
            size = len(body)
        print(
            f"GET {page:<24} median {statistics.median(times) * 1e3:7.1f} ms   "
            f"max {max(times) * 1e3:7.1f} ms   {size / 1024:7.0f} KiB"
        )


if __name__ == "__main__":
    main()
