-- The balances of many accounts in one statement. `wanted` is a JSON array of {account, ledger}, each optionally
-- with the balance `seen` in an earlier snapshot `seen_at`. Such a balance is brought up to date: the one seen, plus
-- the postings of the transactions that snapshot could not see (committed since, or in progress then). Postings
-- are never changed or removed, so nothing else can have moved it. Any other balance, or one whose snapshot is
-- older than the latest refresh (then the longer scan), is the account's snapshot row plus its postings at or above
-- the row's horizon; an account without a row had nothing below the latest run's horizon (hold accounts are never
-- snapshotted). One statement for all the accounts: a function call per account cost an executor start each.
-- A balance is numeric (migration 0007): each posting is bounded, but nothing bounds the sum of many, and a bigint
-- result made every read of an account past 2^63-1 fail (issue 14).
CREATE OR REPLACE FUNCTION ledger_balances(wanted jsonb) RETURNS TABLE (account text, ledger text, balance numeric)
    LANGUAGE sql STABLE
    SET enable_seqscan = off  -- rows are found by key: index scans, whatever the statistics say (migration 0004)
    SET plan_cache_mode = force_generic_plan  -- one plan per statement and session, not per call (migration 0005)
AS $$
    WITH latest AS (SELECT coalesce(max(horizon), '0'::xid8) AS horizon FROM snapshot_runs)
    SELECT w.account, w.ledger,
           (CASE WHEN w.seen IS NOT NULL AND pg_snapshot_xmin(w.seen_at) >= latest.horizon
                 THEN w.seen + coalesce((
                      SELECT sum(p.amount) FROM postings p
                       WHERE p.account = w.account AND p.ledger = w.ledger
                         AND p.txid >= pg_snapshot_xmin(w.seen_at)
                         AND NOT pg_visible_in_snapshot(p.txid, w.seen_at)), 0)
                 ELSE (SELECT coalesce(s.balance, 0) + coalesce((
                              SELECT sum(p.amount) FROM postings p
                               WHERE p.account = w.account AND p.ledger = w.ledger
                                 AND p.txid >= coalesce(s.horizon, CASE WHEN w.account LIKE 'hold:%' THEN '0'::xid8
                                                                         ELSE latest.horizon END)), 0)
                         FROM (SELECT 1) one  -- the snapshot row, if any: looked up only for a full read
                         LEFT JOIN balance_snapshots s ON s.account = w.account AND s.ledger = w.ledger)
            END)
      FROM jsonb_to_recordset(wanted) AS w(account text, ledger text, seen numeric, seen_at pg_snapshot)
     CROSS JOIN latest
$$;
