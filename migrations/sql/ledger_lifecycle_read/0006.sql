-- Everything a plan decides on, as one document. With lock = true, the plan's users and requests are locked
-- first (inside the caller's transaction), so that nothing read can change before the plan is applied.
-- Balances come from ledger_balances: an account named with the balance `seen` in an earlier snapshot `seen_at` is
-- brought up to date from it, and the document gives the snapshot its own balances were read in.
CREATE OR REPLACE FUNCTION ledger_lifecycle_read(want jsonb) RETURNS jsonb LANGUAGE plpgsql
    SET enable_seqscan = off  -- rows are found by key: index scans, whatever the statistics say (migration 0004)
    SET plan_cache_mode = force_generic_plan  -- one plan per statement and session, not per call (migration 0005)
AS $$
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
            -- Every column, by name (db/lifecycle.py decodes them into domain/lifecycle.py's RequestRow); bytes as
            -- base64, the encoding the apply takes them in too. 32 bytes of base64 have no line break.
            SELECT jsonb_agg(to_jsonb(r) || jsonb_build_object(
                       'request_fingerprint', encode(r.request_fingerprint, 'base64'),
                       'settle_fingerprint', encode(r.settle_fingerprint, 'base64'),
                       'refund_fingerprint', encode(r.refund_fingerprint, 'base64')))
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
