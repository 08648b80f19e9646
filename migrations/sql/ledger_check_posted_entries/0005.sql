-- The postings' statement trigger (postings_balanced): every entry balances per ledger, checked once per statement
-- that posts instead of once per posting at commit: a batch of 100 operations writes 300 postings in one statement.
-- The check covers all of each named entry's postings, so a posting added later to an old entry is refused too.
-- The same trigger checks that the entries exist, which the foreign key did with a lookup and a row lock per
-- posting (entries are never deleted).
-- Existence is one count of the named entries, an index probe each (a NOT EXISTS over them had the planner hash
-- the whole entries table); the missing entry is looked for only when the count falls short.
CREATE OR REPLACE FUNCTION ledger_check_posted_entries() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off  -- rows are found by key: index scans, whatever the statistics say (migration 0004)
    SET plan_cache_mode = force_generic_plan  -- one plan per statement and session, not per call (migration 0005)
AS $$
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
