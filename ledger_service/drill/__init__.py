"""`ledger-service ha-drill` (`make ha-drill`): the failover drill, on this machine only (loopback).

What it does, in one run (run.py, top-down):
1. checks for Debian's patroni, etcd and PostgreSQL 15 (installing them with apt-get when it can: packages.py);
2. starts a 3-member etcd cluster (etcd.py), a per-node cuttable path from each Patroni to etcd (proxy.py), a
   3-node Patroni cluster with synchronous replication (patroni.py), the ledger service pointed at all three
   nodes (service.py), and retrying relay clients holding and settling (clients.py);
3. runs three rounds under load (rounds.py): SIGKILL of the primary's postmaster, SIGKILL of the primary's Patroni
   and PostgreSQL, the primary cut off from etcd while it keeps running; after each, checks that every write the
   clients were told succeeded is in the journal exactly once, that every ledger sums to zero and that the
   reconciliation is clean (checks.py), then brings the old primary back as a replica and checks it agrees;
4. prints each round's figures (report.py) and stops everything it started, whatever happens (processes.py).

The modules, each importing only the ones listed before it: options, processes, packages, proxy, etcd, patroni, service,
clients, checks, rounds, report, run.
"""
