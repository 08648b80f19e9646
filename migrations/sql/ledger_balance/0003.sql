-- The one definition of a balance: the account's snapshot row plus its postings at or above the row's horizon.
-- An account without a row had nothing below the latest run's horizon (hold accounts are never snapshotted).
CREATE OR REPLACE FUNCTION ledger_balance(account text, ledger text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT (coalesce(s.balance, 0) + coalesce((
                SELECT sum(p.amount) FROM postings p
                 WHERE p.account = ledger_balance.account AND p.ledger = ledger_balance.ledger
                   AND p.txid >= coalesce(
                         s.horizon,
                         CASE WHEN ledger_balance.account LIKE 'hold:%' THEN '0'::xid8
                              ELSE (SELECT coalesce(max(horizon), '0'::xid8) FROM snapshot_runs) END)), 0))::bigint
      FROM (SELECT 1) one
      LEFT JOIN balance_snapshots s ON s.account = ledger_balance.account AND s.ledger = ledger_balance.ledger
$$;
