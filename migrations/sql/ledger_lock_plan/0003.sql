-- Lock the request rows (FOR UPDATE, ascending) and then the users (advisory, ascending) a plan touches: always in
-- that order, so that plans cannot deadlock on each other. The user key is the one locks.lock_user takes, so plans
-- also serialize with token changes.
CREATE OR REPLACE FUNCTION ledger_lock_plan(user_ids bigint[], request_ids text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(request_ids) > 0 THEN
        PERFORM 1 FROM requests WHERE request_id = ANY (request_ids) ORDER BY request_id FOR UPDATE;
    END IF;
    IF cardinality(user_ids) > 0 THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('user:' || u, 0))
           FROM (SELECT DISTINCT u FROM unnest(user_ids) AS u ORDER BY u) locked;
    END IF;
END
$$;
