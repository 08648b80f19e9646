"""`ledger-service bench`: the relay workload against the service, side by side with pgbench on the same server.

What it does, in one run (run.py, top-down):
1. starts a PostgreSQL server (embedded, in a temporary folder; or LEDGER_DATABASE_URL's), and the service as a
   separate process (`ledger-service serve`) on a database of its own;
2. runs each scenario for --duration seconds from --clients concurrent relays, --runs times:
   - single:  one HTTP call per ledger operation (hold then settle 90%, hold then refund 5%, consumption 5%);
   - batch:   the same operations through POST /v1/batch, 100 per batch;
   - hot:     single operations, every settlement to one channel (compare with `single`, spread over channels);
   - direct:  the batches without HTTP: this process plans and applies them with the service's own code
              (BatchService, LifecycleService), so the service's HTTP layer is out of the measurement: the batch
              path's ceiling;
   - bare, schema: the batches' rows, one plain SQL statement per batch, into minimal tables (PostgreSQL's
              floor) and into the service's own tables (the schema's ceiling): floor.py;
   - reads:   GET /v1/users/{id} for an account with 1,000 postings and one with 1,000,000;
3. runs pgbench's built-in TPC-B (`pgbench -c 16 -j 2 -T <duration>`) against the same server after each run;
4. prints operations per second, p50/p99 latency and the ratio to pgbench's tps (median, min, max over runs), and
   checks that every ledger sums to zero and that the reconciliation is clean.

The machine is noisy: quote the ratios, not the absolute figures.

The modules, each importing only the ones listed before it: options, http, measurement, cpu, postgres, load,
driver, service, direct, floor, books, report, reads, run.
"""
