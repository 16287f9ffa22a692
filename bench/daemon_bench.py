#!/usr/bin/env python3
"""Measure `dotmac-gitops daemon` on a repository: first sync, commit-to-Synced latency, and
memory over many reconcile cycles.

    daemon_bench.py --bin target/release/dotmac-gitops --repo DIR [--interval 1s]
                    [--commits 5] [--cycles 60] [--port 19190]

DIR must be a git work tree that validates (e.g. `bench/peer/gen_repo.py --git` output with
`dev_placeholders = true` under [providers.secrets]). The daemon runs with --auto-apply
against the local providers; its live state goes under DIR/.dotmac (remove it to start over).

Steps: start the daemon and time /readyz (the first full sync, which applies every tenant
on a fresh state); then make --commits commits that each change one tenant
(billing.payment_methods) and time each from `git commit` to that tenant being Synced at the
new commit; then let --cycles drift-check intervals pass and sample the daemon's RSS
(VmRSS, /proc) after each, printing the first, last and highest. Only the standard library.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import time
import urllib.request


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        return r.status, r.read()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def git(repo, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid")
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--interval", default="1s")
    ap.add_argument("--commits", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=60)
    ap.add_argument("--port", type=int, default=19190)
    a = ap.parse_args()
    log = open(os.path.join(a.repo, "..", "daemon-bench.log"), "w")
    d = subprocess.Popen([a.bin, "daemon", "--repo", a.repo, "--auto-apply", "--interval", a.interval,
                          "--listen", f"127.0.0.1:{a.port}"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        t0 = time.monotonic()
        while True:
            time.sleep(0.2)
            try:
                if get(a.port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if d.poll() is not None:
                raise SystemExit("the daemon exited; see daemon-bench.log")
        status = json.loads(get(a.port, "/api/v1/status")[1])
        print(f"first sync: {time.monotonic() - t0:.1f} s for {len(status['tenants'])} tenants "
              f"({status['summary']}), RSS {rss_kib(d.pid) // 1024} MiB")

        tenants = sorted(os.listdir(os.path.join(a.repo, "tenants")))
        for i in range(a.commits):
            t = tenants[(i * 7919) % len(tenants)]
            path = os.path.join(a.repo, "tenants", t, "tenant.yaml")
            text = open(path).read()
            m = re.search(r"payment_methods: \[(.*)\]", text)
            new = "[card]" if m.group(1) != "card" else "[card, ach]"
            open(path, "w").write(text.replace(m.group(0), f"payment_methods: {new}"))
            git(a.repo, "commit", "-qam", f"bench: {t}")
            commit = git(a.repo, "rev-parse", "HEAD")
            c0 = time.monotonic()
            while True:
                v = json.loads(get(a.port, f"/api/v1/tenants/{t}")[1])
                if v["status"] == "Synced" and v["revision"] == commit:
                    break
                time.sleep(0.02)
            print(f"commit {i + 1} ({t}): Synced after {time.monotonic() - c0:.2f} s")

        samples = []
        step = float(a.interval.rstrip("ms")) / (1000 if a.interval.endswith("ms") else 1)
        if a.interval.endswith("m") and not a.interval.endswith("ms"):
            step = float(a.interval[:-1]) * 60
        for _ in range(a.cycles):
            time.sleep(step)
            samples.append(rss_kib(d.pid))
        if samples:
            print(f"RSS over {a.cycles} intervals of {a.interval}: first {samples[0] // 1024} MiB, "
                  f"last {samples[-1] // 1024} MiB, highest {max(samples) // 1024} MiB")
            m = get(a.port, "/metrics")[1].decode()
            for name in ("dotmac_reconciled_tenants_total", "dotmac_reconcile_duration_seconds_count",
                         "dotmac_reconcile_duration_seconds_sum"):
                line = next((l for l in m.splitlines() if l.startswith(name + " ")), None)
                print(line)
    finally:
        d.send_signal(signal.SIGTERM)
        code = d.wait(timeout=60)
        print(f"daemon exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
