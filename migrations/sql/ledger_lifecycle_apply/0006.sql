-- Apply a plan: check its premises, then write its requests, entries and postings set-based.
-- The request rows it moves are locked and compared first. The users' locks are taken only after the writes, so
-- that they are held for the balance check and the commit, not for the writes: the balances then include the
-- plan's own postings, and each premise (the range a balance must be in for the plan's decisions to stand) is
-- shifted by the plan's own change.
-- A premise that no longer holds: nothing is written (or everything is rolled back, SQLSTATE LS001).
-- The balance premises are checked with ledger_balances, brought up to date from the balances the plan's read saw.
CREATE OR REPLACE FUNCTION ledger_lifecycle_apply(plan jsonb) RETURNS jsonb LANGUAGE plpgsql
    SET enable_seqscan = off  -- rows are found by key: index scans, whatever the statistics say (migration 0004)
    SET plan_cache_mode = force_generic_plan  -- one plan per statement and session, not per call (migration 0005)
AS $$
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

    -- Requests first created by this plan, in their final state; a taken request_id fails the whole plan. A hold
    -- expires plan->'expires_in'->request_id seconds from now; a hold created already resolved (settled in the
    -- same batch) is resolved now.
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
                   decode(r.request_fingerprint, 'base64'), decode(r.settle_fingerprint, 'base64'),
                   decode(r.refund_fingerprint, 'base64'),
                   now() + make_interval(secs => (plan->'expires_in'->>r.request_id)::bigint),
                   CASE WHEN r.kind = 'hold' AND r.status <> 'open' THEN now() END
              FROM jsonb_to_recordset(plan->'new_requests') AS r(
                   request_id text, kind text, status text, user_id bigint, token_id bigint, token_limited boolean,
                   group_name text, model text, prompt_tokens bigint, max_tokens bigint, amount bigint, trusted boolean,
                   model_ratio numeric, completion_ratio numeric, group_ratio numeric, model_price numeric,
                   channel_id bigint, settled_prompt_tokens bigint, completion_tokens bigint, charged bigint,
                   late boolean, request_fingerprint text, settle_fingerprint text, refund_fingerprint text)
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
               settle_fingerprint = decode(u.settle_fingerprint, 'base64'),
               refund_fingerprint = decode(u.refund_fingerprint, 'base64'), resolved_at = now()
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
               (doc->>'channel_id')::bigint, (doc->>'charged')::bigint, doc->'details', decode(doc->>'hash', 'base64')
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
