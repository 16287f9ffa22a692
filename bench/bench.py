#!/usr/bin/env python3
"""The engine side by side with the peer (the seeds' Python/Jinja2 stack), in one run.

    bench/bench.py [--tenants 10000] [--also 100000] [--runs 3] [--warmup 1] [--change 10]
                   [--keep DIR] [--no-peer] [--only cold] [--engine PATH]

For each size it generates a repository with bench/peer/gen_repo.py (with a second commit
editing one tenant, for `diff`), then times, on the same files:

  parse-only floor      read and parse every file once, nothing else
  plan + apply (cold)   from an empty live state and state store
  no-op plan            right after the apply
  plan, K tenants edited
  diff, 1 tenant        `diff --base --head` between the two commits (engine only)

and prints a table: measure, engine, peer, ratio, peak RSS of each. Times are medians of
--runs runs (the cold apply starts from a clean state each time). Before the plans
that follow an apply or an edit, each tool runs the same plan --warmup times untimed, so
that neither is timed against a page cache the other one's run just filled with its own
files. The engine is the release
build of this checkout (under $CARGO_TARGET_DIR if set; built if missing), or --engine.
--no-peer times the engine only; --only cold stops after the cold plan + apply. Not a
test: nothing here asserts a number.
"""
import argparse
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GEN = os.path.join(HERE, "peer", "gen_repo.py")
PEER = os.path.join(HERE, "peer", "peer_plan.py")
ENGINE = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "dotmac-gitops")
NOW = "2026-11-22T00:00:00Z"

PEER_PARSE = r"""
import glob, os, sys, yaml
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
n = 0
for pattern in ("catalog/*.yaml", "environments/*.yaml", "tenants/**/*.yaml"):
    for path in glob.glob(os.path.join(sys.argv[1], pattern), recursive=True):
        with open(path) as f:
            n += sum(1 for d in yaml.load_all(f, Loader=Loader) if d is not None)
print(n, "documents")
"""


def tail(f, n=65536):
    """The last `n` bytes of an open file, as text."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - n))
    return f.read().decode(errors="replace")


def run(cmd, cwd=None, env=None, ok=(0,)):
    """Runs `cmd`; returns (seconds, peak RSS in MiB, the end of its stdout)."""
    # Whatever the previous command left for the kernel to write back is written now, outside
    # the timing: at 100,000 tenants an apply leaves gigabytes dirty, and their writeback
    # would otherwise land in the next measure, whichever program it times.
    os.sync()
    # Output goes to files: a pipe nobody reads while waiting would block a chatty child.
    # Only their ends are read back (the apply's summary is its last line). This process
    # must stay small: a child's peak RSS counts this process's memory at the fork (the
    # kernel carries it over at exec), and forking a large process takes longer. Reading
    # whole outputs (a 100,000-tenant plan prints hundreds of MB) once had `diff` measured
    # at 458 MiB and 66 ms, against 59 MiB and 40-50 ms run alone.
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        start = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - start
        out, err = tail(fo), tail(fe)
    code = os.waitstatus_to_exitcode(status)
    if code not in ok:
        sys.exit(f"{' '.join(cmd)} exited {code}:\n{out[-2000:]}\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024, out


def median(samples):
    return (statistics.median(s for s, _ in samples), max(r for _, r in samples))


def engine(repo, *args, ok=(0,)):
    env = dict(os.environ, NO_COLOR="1")
    env.pop("DOTMAC_LOG", None)
    return run([ENGINE, *args, "--repo", repo], env=env, ok=ok)


def edit_tenants(repo, k, value):
    """Changes the Stripe sync interval of the first k tenants that have one."""
    edited = 0
    for d in sorted(os.listdir(os.path.join(repo, "tenants"))):
        path = os.path.join(repo, "tenants", d, "tenant.yaml")
        with open(path) as f:
            text = f.read()
        marker = "    sync_interval_minutes: "
        if marker not in text:
            continue
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if line.startswith(marker):
                lines[i] = marker + str(value)
                break
        with open(path, "w") as f:
            f.write("\n".join(lines))
        edited += 1
        if edited == k:
            break
    return edited


def bench_size(tenants, runs, change, workdir, peer=True, only=None, warmup=1):
    repo = os.path.join(workdir, f"repo-{tenants}")
    out = subprocess.run(
        [sys.executable, GEN, "--tenants", str(tenants), "--out", repo, "--git", "--change", "1"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    base, head = out[out.index("base") + 1], out[out.index("head") + 1]
    # The generator's external secrets are not in the offline store: stand placeholders in.
    toml = os.path.join(repo, "dotmac.toml")
    with open(toml) as f:
        text = f.read()
    with open(toml, "w") as f:
        f.write(text.replace('[providers.secrets]\nkind = "local"\n',
                             '[providers.secrets]\nkind = "local"\ndev_placeholders = true\n'))
    live = os.path.join(workdir, f"peer-live-{tenants}")
    rows = []

    # Parse-only floor.
    e = median([engine(repo, "bench-parse")[:2] for _ in range(runs)])
    p = median([run([sys.executable, "-c", PEER_PARSE, repo])[:2] for _ in range(runs)]) if peer else None
    rows.append(("parse-only floor", e, p))

    # Plan + apply from empty.
    samples_e, samples_p = [], []
    resources = None
    for _ in range(runs):
        shutil.rmtree(os.path.join(repo, ".dotmac"), ignore_errors=True)
        t, rss, out = engine(repo, "apply", "--auto-approve", "--now", NOW)
        samples_e.append((t, rss))
        m = re.search(r"Apply complete: (\d+) changes", out)
        resources = int(m.group(1)) if m else None
        if peer:
            shutil.rmtree(live, ignore_errors=True)
            samples_p.append(run([sys.executable, PEER, repo, "--live", live, "--apply", "--now", NOW])[:2])
    rows.append(("plan + apply, from empty", median(samples_e), median(samples_p) if peer else None))
    if only == "cold":
        return rows, rows[0][1][0], resources

    def timed(cmd):
        """The median of `runs` runs of `cmd` after `warmup` untimed ones."""
        for _ in range(warmup):
            cmd()
        return median([cmd()[:2] for _ in range(runs)])

    # No-op plan.
    e = timed(lambda: engine(repo, "plan", "--now", NOW))
    p = timed(lambda: run([sys.executable, PEER, repo, "--live", live, "--now", NOW])) if peer else None
    rows.append(("no-op plan", e, p))
    floor_e = rows[0][1][0]

    # A plan after editing K tenants.
    edited = edit_tenants(repo, change, 47)
    e = timed(lambda: engine(repo, "plan", "--now", NOW))
    p = timed(lambda: run([sys.executable, PEER, repo, "--live", live, "--now", NOW])) if peer else None
    rows.append((f"plan, {edited} tenants edited", e, p))
    subprocess.run(["git", "-C", repo, "checkout", "-q", "--", "tenants"], check=True)

    # diff between the commits, one tenant changed.
    e = median([engine(repo, "diff", "--base", base, "--head", head, ok=(0, 2))[:2] for _ in range(runs)])
    rows.append(("diff --base --head, 1 tenant", e, None))

    return rows, floor_e, resources


def fmt_s(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=10000)
    ap.add_argument("--also", type=int, action="append", default=[], help="another size, e.g. 100000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before each plan measure")
    ap.add_argument("--change", type=int, default=10, help="tenants edited for the third measure")
    ap.add_argument("--keep", help="work in this folder and keep it")
    ap.add_argument("--no-peer", action="store_true", help="time the engine only")
    ap.add_argument("--only", choices=["cold"], help="cold: stop after the cold plan + apply")
    ap.add_argument("--engine", help="the binary to time (default: this checkout's release build)")
    a = ap.parse_args()
    global ENGINE
    if a.engine:
        ENGINE = os.path.abspath(a.engine)

    if not os.path.exists(ENGINE):
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    try:
        import jinja2, yaml  # noqa: F401
    except ImportError:
        if not a.no_peer:
            sys.exit("the peer needs jinja2 and pyyaml: pip install jinja2 pyyaml (scripts/test-deps.sh does)")

    workdir = a.keep or tempfile.mkdtemp(prefix="dotmac-bench-")
    os.makedirs(workdir, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, {platform.platform()}; "
          f"load {os.getloadavg()[0]:.2f}")
    peer = "none" if a.no_peer else f"{PEER} (Python {platform.python_version()})"
    print(f"engine: {ENGINE}; peer: {peer}; {a.runs} runs, median; {a.warmup} warm-up\n")
    try:
        for n in [a.tenants, *a.also]:
            rows, floor, resources = bench_size(n, a.runs, a.change, workdir, not a.no_peer, a.only, a.warmup)
            about = f" ({resources:,} resources)" if resources else ""
            print(f"### {n:,} tenants{about}\n")
            print("| measure | engine | peer | ratio | engine peak RSS | peer peak RSS |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for name, (et, er), p in rows:
                if p is None:
                    print(f"| {name} | {fmt_s(et)} | — | — | {er:.0f} MiB | — |")
                else:
                    pt, pr = p
                    print(f"| {name} | {fmt_s(et)} | {fmt_s(pt)} | {pt / et:.1f}× | {er:.0f} MiB | {pr:.0f} MiB |")
            noop = next((r for r in rows if r[0] == "no-op plan"), None)
            if noop:
                print(f"\nno-op plan / parse-only floor: {noop[1][0] / floor:.2f}×\n", flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
