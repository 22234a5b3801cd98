#!/usr/bin/env python3
"""How much CI's builds compile, without building: `python3
xtask/scripts/build-units.py` from the workspace root.

Counts the compilations the CI's cargo invocations need, from cargo's unit
graph (`--unit-graph`, read with RUSTC_BOOTSTRAP=1; nothing is built): every invocation's units, keyed like cargo's metadata hash
(package, target, profile, mode, features, and the keys of its dependencies).
Prints the sum over invocations and the number of distinct units, and the
number of third-party packages compiled more than once (different features)."""
import json, os, subprocess, sys, hashlib, collections

def graph(args):
    env = dict(os.environ, RUSTC_BOOTSTRAP="1")
    out = subprocess.run(["cargo", *args, "--unit-graph", "-Z", "unstable-options"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["units"]

def keys(units):
    memo = {}
    def key(i):
        if i in memo: return memo[i]
        u = units[i]
        p = u["profile"]
        prof = (p["opt_level"], p["debuginfo"] if "debuginfo" in p else None, p.get("panic"))
        deps = sorted(key(d["index"]) for d in u["dependencies"])
        h = hashlib.sha1(json.dumps([u["pkg_id"], u["target"]["name"], u["target"]["kind"], prof,
                                     u["mode"], sorted(u["features"]), u["platform"], deps]).encode()).hexdigest()
        memo[i] = h
        return h
    return [(key(i), units[i]["pkg_id"] + " " + ",".join(units[i]["target"]["kind"]), units[i]["mode"])
            for i in range(len(units))]

meta = json.loads(subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1"],
                                 capture_output=True, text=True, check=True).stdout)
pkgs = sorted(p["name"] for p in meta["packages"])
invocations = [["clippy", "--workspace", "--all-targets"]]
for p in pkgs:
    invocations.append(["test", "-p", p, "--all-targets", "--no-run"])
invocations.append(["build", "-p", "tern-node", "--bins"])
invocations.append(["build", "-p", "tern-lab", "--bins"])
invocations.append(["build", "-p", "tern-benches", "--bins"])
total, distinct, by_pkg = 0, set(), collections.defaultdict(set)
for inv in invocations:
    try:
        ks = keys(graph(inv))
    except subprocess.CalledProcessError as e:
        print("skip", inv, e.stderr[:200], file=sys.stderr); continue
    total += len(ks)
    for k, pkg, mode in ks:
        distinct.add(k)
        if mode in ("build", "check") and not pkg.startswith("path+") and "custom-build" not in pkg:
            by_pkg[(pkg.split("#")[-1], mode)].add(k)
multi = {p: len(v) for p, v in by_pkg.items() if len(v) > 1}
print(f"invocations: {len(invocations)}")
print(f"units summed over invocations: {total}")
print(f"distinct units (what one shared target dir compiles): {distinct.__len__()}")
print(f"third-party crates built in more than one variant: {len(multi)} (extra builds: {sum(v-1 for v in multi.values())})")
for p, n in sorted(multi.items(), key=lambda x: -x[1])[:15]:
    print(f"  {p[0]} ({p[1]}): {n}")
