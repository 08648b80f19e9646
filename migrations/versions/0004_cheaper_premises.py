"""Cheaper premises: a plan's balances are checked from what its read saw; entry existence by index probes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

`ledger_lifecycle_read` now also returns the snapshot its balances were read in, and takes balances the service read
before with the snapshot they were read in. `ledger_balances` brings such a balance up to date with the postings
that snapshot could not see, instead of reading it again from its materialized snapshot (a scan of every posting
since the last refresh, with a heap visit each), and computes all the balances of a call in one statement.
`ledger_lifecycle_apply` checks balance premises the same way. The postings
trigger checks that the entries it names exist with one index probe per entry, where the planner used to hash
the whole entries table. The account and request_id checks accept the same strings with a cheaper regular
expression, and four entry indexes leave out the entries they can never find. See docs/performance.md.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

from ledger_service.db.scripts import run_script, statements

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None

UPGRADE = """
-- The same address and request_id rules without a bounded repetition: PostgreSQL's regular expression engine
-- builds DFA states afresh for every match, and '{1,128}' kept it busy for every character of every posting's
-- account (a large share of the server's CPU under load). '+' and a length bound accept exactly the same strings.
ALTER TABLE postings DROP CONSTRAINT postings_account_check;
ALTER TABLE postings ADD CONSTRAINT postings_account_check CHECK (
    account ~ '^(system|user|token|hold|channel):[A-Za-z0-9._:-]+$'
    AND length(account) <= length(split_part(account, ':', 1)) + 1 + 128);
ALTER TABLE requests DROP CONSTRAINT requests_request_id_check;
ALTER TABLE requests ADD CONSTRAINT requests_request_id_check CHECK (
    request_id ~ '^[A-Za-z0-9._:-]+$' AND length(request_id) <= 128);

-- Index only the entries an index can find: a lifecycle entry has no reference and reverses nothing, and a hold,
-- refund or expiry names no channel, so each of these index entries was written and never read. A lookup by
-- `column = value` implies `column IS NOT NULL`, so every query that used the full indexes uses these.
ALTER TABLE entries DROP CONSTRAINT entries_reference_key;
CREATE UNIQUE INDEX entries_reference_key ON entries (reference) WHERE reference IS NOT NULL;
ALTER TABLE entries DROP CONSTRAINT entries_reverses_key;
CREATE UNIQUE INDEX entries_reverses_key ON entries (reverses) WHERE reverses IS NOT NULL;
DROP INDEX entries_by_channel;
CREATE INDEX entries_by_channel ON entries (channel_id, txid, id) WHERE channel_id IS NOT NULL;
DROP INDEX entries_by_token;
CREATE INDEX entries_by_token ON entries (token_id, txid, id) WHERE token_id IS NOT NULL;

CREATE OR REPLACE FUNCTION ledger_check_posted_entries() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    named bigint[] := ARRAY(SELECT DISTINCT entry_id FROM posted);
    offender record;
BEGIN
    IF (SELECT count(*) FROM entries e WHERE e.id = ANY (named)) <> cardinality(named) THEN
        SELECT n.entry_id INTO offender
          FROM unnest(named) AS n(entry_id)
         WHERE NOT EXISTS (SELECT 1 FROM entries e WHERE e.id = n.entry_id)
         LIMIT 1;
        RAISE EXCEPTION 'postings name entry %, which does not exist', offender.entry_id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'postings_entry_id_fkey';
    END IF;
    SELECT p.entry_id, p.ledger, sum(p.amount) AS total INTO offender
      FROM postings p
     WHERE p.entry_id = ANY (named)
     GROUP BY p.entry_id, p.ledger HAVING sum(p.amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'entry % does not balance: ledger % sums to %', offender.entry_id, offender.ledger,
            offender.total USING ERRCODE = 'check_violation', CONSTRAINT = 'postings_balanced';
    END IF;
    RETURN NULL;
END
$$;

-- The balances of many accounts in one statement. `wanted` is a JSON array of {account, ledger}, each optionally
-- with the balance `seen` in an earlier snapshot `seen_at`. Such a balance is brought up to date: the one seen, plus
-- the postings of the transactions that snapshot could not see (committed since, or in progress then). Postings
-- are never changed or removed, so nothing else can have moved it. Any other balance, or one whose snapshot is
-- older than the latest refresh (then the longer scan), is the account's snapshot row plus its postings at or above
-- the row's horizon; an account without a row had nothing below the latest run's horizon (hold accounts are never
-- snapshotted). One statement for all the accounts: a function call per account cost an executor start each.
CREATE FUNCTION ledger_balances(wanted jsonb) RETURNS TABLE (account text, ledger text, balance bigint)
    LANGUAGE sql STABLE AS $$
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
            END)::bigint
      FROM jsonb_to_recordset(wanted) AS w(account text, ledger text, seen bigint, seen_at pg_snapshot)
     CROSS JOIN latest
$$;

-- The one definition of a balance, for one account (journal reads).
CREATE OR REPLACE FUNCTION ledger_balance(account text, ledger text) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT b.balance
      FROM ledger_balances(jsonb_build_array(jsonb_build_object('account', account, 'ledger', ledger))) b
$$;

CREATE OR REPLACE FUNCTION ledger_lifecycle_read(want jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    found jsonb;
BEGIN
    IF (want->>'lock')::boolean THEN
        PERFORM ledger_lock_plan(ARRAY(SELECT jsonb_array_elements_text(want->'lock_users')::bigint),
                                 ARRAY(SELECT jsonb_array_elements_text(want->'lock_requests')));
    END IF;
    SELECT jsonb_build_object(
        'now', clock_timestamp(),
        -- The snapshot every balance below was read in. Only outside a transaction that already has an id (a
        -- locked read): such a snapshot leaves that transaction out of its in-progress list, as if it had
        -- committed, so its own later postings would count as seen. None then: nothing is remembered from it.
        'seen_at', CASE WHEN pg_current_xact_id_if_assigned() IS NULL THEN pg_current_snapshot()::text END,
        'requests', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'request_id', r.request_id, 'kind', r.kind, 'status', r.status, 'user_id', r.user_id,
                'token_id', r.token_id, 'token_limited', r.token_limited, 'group_name', r.group_name,
                'model', r.model, 'prompt_tokens', r.prompt_tokens, 'max_tokens', r.max_tokens, 'amount', r.amount,
                'trusted', r.trusted, 'model_ratio', r.model_ratio::text, 'completion_ratio', r.completion_ratio::text,
                'group_ratio', r.group_ratio::text, 'model_price', r.model_price::text, 'channel_id', r.channel_id,
                'charged', r.charged, 'late', r.late, 'settled_prompt_tokens', r.settled_prompt_tokens,
                'completion_tokens', r.completion_tokens,
                'request_fingerprint', encode(r.request_fingerprint, 'base64'),  -- 32 bytes: no line breaks
                'settle_fingerprint', encode(r.settle_fingerprint, 'base64'),
                'refund_fingerprint', encode(r.refund_fingerprint, 'base64'),
                'created_at', r.created_at, 'expires_at', r.expires_at))
              FROM requests r
             WHERE r.request_id = ANY (ARRAY(SELECT jsonb_array_elements_text(want->'request_ids')))), '[]'),
        'tokens', coalesce((
            SELECT jsonb_agg(jsonb_build_object('token_id', t.token_id, 'user_id', t.user_id, 'unlimited', t.unlimited))
              FROM tokens t
             WHERE t.token_id = ANY (ARRAY(SELECT jsonb_array_elements_text(want->'token_ids')::bigint))), '[]'),
        'balances', coalesce((
            SELECT jsonb_agg(jsonb_build_object('account', b.account, 'ledger', b.ledger, 'balance', b.balance))
              FROM ledger_balances((
                   SELECT coalesce(jsonb_agg(a), '[]')
                     FROM jsonb_array_elements(want->'accounts') a
                    WHERE a->>'account' NOT IN (  -- an unlimited token's allowance decides nothing: not read
                          SELECT 'token:' || t.token_id FROM tokens t
                           WHERE t.unlimited
                             AND t.token_id = ANY (ARRAY(SELECT jsonb_array_elements_text(want->'token_ids')::bigint))))
                   ) b), '[]'),
        'models', coalesce((
            SELECT jsonb_agg(jsonb_build_object('model', m.model, 'model_ratio', m.model_ratio::text,
                                                'completion_ratio', m.completion_ratio::text,
                                                'model_price', m.model_price::text))
              FROM model_prices m
             WHERE m.model = ANY (ARRAY(SELECT jsonb_array_elements_text(want->'models')))), '[]'),
        'groups', coalesce((
            SELECT jsonb_agg(jsonb_build_object('group_name', g.group_name, 'group_ratio', g.group_ratio::text))
              FROM group_ratios g
             WHERE g.group_name = ANY (ARRAY(SELECT jsonb_array_elements_text(want->'groups')))), '[]')
    ) INTO found;
    RETURN found;
END
$$;

CREATE OR REPLACE FUNCTION ledger_lifecycle_apply(plan jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    expected_requests integer := jsonb_array_length(plan->'expect_requests');
    matching integer;
    created jsonb;
BEGIN
    IF expected_requests > 0 THEN
        PERFORM ledger_lock_plan('{}',
            ARRAY(SELECT e->>'request_id' FROM jsonb_array_elements(plan->'expect_requests') e));
        SELECT count(*) INTO matching
          FROM jsonb_to_recordset(plan->'expect_requests') AS e(request_id text, status text)
          JOIN requests r ON r.request_id = e.request_id AND r.status = e.status
         WHERE r.request_id = ANY (ARRAY(SELECT x->>'request_id' FROM jsonb_array_elements(plan->'expect_requests') x));
        IF matching <> expected_requests THEN
            RETURN '{"stale": true}';
        END IF;
    END IF;

    -- Requests first created by this plan, in their final state; a taken request_id fails the whole plan.
    created := '[]';
    IF jsonb_array_length(plan->'new_requests') > 0 THEN
        WITH inserted AS (
            INSERT INTO requests (request_id, kind, status, user_id, token_id, token_limited, group_name,
                                  model, prompt_tokens, max_tokens, amount, trusted, model_ratio,
                                  completion_ratio, group_ratio, model_price, channel_id, settled_prompt_tokens,
                                  completion_tokens, charged, late, request_fingerprint, settle_fingerprint,
                                  refund_fingerprint, expires_at, resolved_at)
            SELECT r.request_id, r.kind, r.status, r.user_id, r.token_id, r.token_limited, r.group_name, r.model,
                   r.prompt_tokens, r.max_tokens, r.amount, r.trusted, r.model_ratio, r.completion_ratio, r.group_ratio,
                   r.model_price, r.channel_id, r.settled_prompt_tokens, r.completion_tokens, r.charged, r.late,
                   decode(r.request_fingerprint, 'hex'), decode(r.settle_fingerprint, 'hex'),
                   decode(r.refund_fingerprint, 'hex'),
                   now() + make_interval(secs => r.expires_in), CASE WHEN r.resolved THEN now() END
              FROM jsonb_to_recordset(plan->'new_requests') AS r(
                   request_id text, kind text, status text, user_id bigint, token_id bigint, token_limited boolean,
                   group_name text, model text, prompt_tokens bigint, max_tokens bigint, amount bigint, trusted boolean,
                   model_ratio numeric, completion_ratio numeric, group_ratio numeric, model_price numeric,
                   channel_id bigint, settled_prompt_tokens bigint, completion_tokens bigint, charged bigint,
                   late boolean, request_fingerprint text, settle_fingerprint text, refund_fingerprint text,
                   expires_in bigint, resolved boolean)
            RETURNING request_id, created_at, expires_at
        )
        SELECT coalesce(jsonb_agg(jsonb_build_object('request_id', request_id, 'created_at', created_at,
                                                     'expires_at', expires_at)), '[]')
          INTO created FROM inserted;
    END IF;

    -- Requests that existed before the plan, moved to their final state (the lifecycle trigger checks the step).
    IF jsonb_array_length(plan->'updated_requests') > 0 THEN
        UPDATE requests r
           SET status = u.status, channel_id = u.channel_id, settled_prompt_tokens = u.settled_prompt_tokens,
               completion_tokens = u.completion_tokens, charged = u.charged, late = u.late,
               settle_fingerprint = decode(u.settle_fingerprint, 'hex'),
               refund_fingerprint = decode(u.refund_fingerprint, 'hex'), resolved_at = now()
          FROM jsonb_to_recordset(plan->'updated_requests') AS u(
               request_id text, status text, channel_id bigint, settled_prompt_tokens bigint, completion_tokens bigint,
               charged bigint, late boolean, settle_fingerprint text, refund_fingerprint text)
         WHERE r.request_id = u.request_id
           AND r.request_id = ANY (ARRAY(SELECT x->>'request_id'
                                           FROM jsonb_array_elements(plan->'updated_requests') x));
    END IF;

    -- Entries in plan order, each with its postings; the postings' trigger checks that every entry balances.
    WITH planned AS (
        SELECT nextval('entries_id_seq'::regclass) AS id, e.doc
          FROM jsonb_array_elements(plan->'entries') WITH ORDINALITY AS e(doc, position)
    ), entry AS (
        INSERT INTO entries (id, kind, request_id, user_id, token_id, channel_id, charged, details, hash)
        OVERRIDING SYSTEM VALUE
        SELECT id, doc->>'kind', doc->>'request_id', (doc->>'user_id')::bigint, (doc->>'token_id')::bigint,
               (doc->>'channel_id')::bigint, (doc->>'charged')::bigint, doc->'details', decode(doc->>'hash', 'hex')
          FROM planned
    )
    INSERT INTO postings (entry_id, ledger, account, amount)
    SELECT planned.id, p->>0, p->>1, (p->>2)::bigint
      FROM planned, jsonb_array_elements(planned.doc->'postings') AS p;

    -- The balance premises, under the users' locks: each statement reads a fresh snapshot, taken after the locks
    -- were granted, in which the plan's own postings are visible.
    IF jsonb_array_length(plan->'lock_users') > 0 THEN
        PERFORM ledger_lock_plan(ARRAY(SELECT jsonb_array_elements_text(plan->'lock_users')::bigint), '{}');
    END IF;
    IF jsonb_array_length(plan->'expect_balances') > 0 AND EXISTS (
               SELECT 1
                 FROM ledger_balances(plan->'expect_balances') n
                 JOIN jsonb_to_recordset(plan->'expect_balances')
                      AS b(account text, ledger text, low numeric, high numeric)  -- bounds may exceed bigint
                      ON b.account = n.account AND b.ledger = n.ledger
                WHERE n.balance < b.low OR n.balance > b.high) THEN
        RAISE EXCEPTION 'a balance this plan was decided on has changed' USING ERRCODE = 'LS001';
    END IF;
    IF jsonb_array_length(plan->'expect_tokens') > 0 AND EXISTS (
               SELECT 1 FROM jsonb_to_recordset(plan->'expect_tokens') AS t(token_id bigint, unlimited boolean)
                LEFT JOIN tokens k ON k.token_id = t.token_id
                WHERE k.unlimited IS DISTINCT FROM t.unlimited) THEN
        RAISE EXCEPTION 'a token this plan was decided on has changed' USING ERRCODE = 'LS001';
    END IF;

    RETURN jsonb_build_object('created', created);
END
$$;

-- These functions find rows by key: request ids, token ids, accounts, entry ids. An index scan is right for them
-- whatever the statistics say, and the statistics can be badly wrong: on a young ledger the tables grow from
-- empty faster than autovacuum analyzes them, and a plan cached while `requests` looked empty went on
-- scanning all of it for every call.
ALTER FUNCTION ledger_lifecycle_read(jsonb) SET enable_seqscan = off;
ALTER FUNCTION ledger_lifecycle_apply(jsonb) SET enable_seqscan = off;
ALTER FUNCTION ledger_lock_plan(bigint[], text[]) SET enable_seqscan = off;
ALTER FUNCTION ledger_check_posted_entries() SET enable_seqscan = off;
ALTER FUNCTION ledger_balances(jsonb) SET enable_seqscan = off;
"""

_REPLACED = ("ledger_check_posted_entries", "ledger_balance", "ledger_lifecycle_read", "ledger_lifecycle_apply")


def _previous_definitions() -> str:
    """0003's definitions of the functions this revision replaces: what a downgrade restores."""
    spec = importlib.util.spec_from_file_location(
        "revision_0003", Path(__file__).with_name("0003_lifecycle_functions.py")
    )
    assert spec is not None
    assert spec.loader is not None
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    definitions = []
    for statement in statements(previous.UPGRADE):
        code = "\n".join(line for line in statement.splitlines() if not line.startswith("--"))  # leading comments
        if code.startswith("CREATE FUNCTION") and code.split()[2].split("(")[0] in _REPLACED:
            definitions.append(code.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    if len(definitions) != len(_REPLACED):
        raise RuntimeError(f"revision 0003 defines {len(definitions)} of the {len(_REPLACED)} functions to restore")
    return "\n".join(definitions)


def upgrade() -> None:
    run_script(op.get_bind(), UPGRADE)


PREVIOUS_CHECKS = """
ALTER TABLE postings DROP CONSTRAINT postings_account_check;
ALTER TABLE postings ADD CONSTRAINT postings_account_check
    CHECK (account ~ '^(system|user|token|hold|channel):[A-Za-z0-9._:-]{1,128}$');
ALTER TABLE requests DROP CONSTRAINT requests_request_id_check;
ALTER TABLE requests ADD CONSTRAINT requests_request_id_check CHECK (request_id ~ '^[A-Za-z0-9._:-]{1,128}$');
"""


PREVIOUS_INDEXES = """
DROP INDEX entries_reference_key;
ALTER TABLE entries ADD CONSTRAINT entries_reference_key UNIQUE (reference);
DROP INDEX entries_reverses_key;
ALTER TABLE entries ADD CONSTRAINT entries_reverses_key UNIQUE (reverses);
DROP INDEX entries_by_channel;
CREATE INDEX entries_by_channel ON entries (channel_id, txid, id);
DROP INDEX entries_by_token;
CREATE INDEX entries_by_token ON entries (token_id, txid, id);
"""


def downgrade() -> None:
    op.execute("ALTER FUNCTION ledger_lock_plan(bigint[], text[]) RESET enable_seqscan")
    run_script(op.get_bind(), PREVIOUS_INDEXES)
    run_script(op.get_bind(), PREVIOUS_CHECKS)
    run_script(op.get_bind(), _previous_definitions())
    op.execute("DROP FUNCTION ledger_balances(jsonb)")
