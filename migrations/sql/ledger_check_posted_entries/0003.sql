-- The postings' statement trigger (postings_balanced): every entry balances per ledger, checked once per statement
-- that posts instead of once per posting at commit: a batch of 100 operations writes 300 postings in one statement.
-- The check covers all of each named entry's postings, so a posting added later to an old entry is refused too.
-- The same trigger checks that the entries exist, which the foreign key did with a lookup and a row lock per
-- posting (entries are never deleted).
CREATE OR REPLACE FUNCTION ledger_check_posted_entries() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    offender record;
BEGIN
    SELECT n.entry_id INTO offender
      FROM (SELECT DISTINCT entry_id FROM posted) n
     WHERE NOT EXISTS (SELECT 1 FROM entries e WHERE e.id = n.entry_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'postings name entry %, which does not exist', offender.entry_id
            USING ERRCODE = 'foreign_key_violation', CONSTRAINT = 'postings_entry_id_fkey';
    END IF;
    SELECT p.entry_id, p.ledger, sum(p.amount) AS total INTO offender
      FROM postings p
     WHERE p.entry_id = ANY (ARRAY(SELECT DISTINCT entry_id FROM posted))  -- index probes, whatever the size
     GROUP BY p.entry_id, p.ledger HAVING sum(p.amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'entry % does not balance: ledger % sums to %', offender.entry_id, offender.ledger,
            offender.total USING ERRCODE = 'check_violation', CONSTRAINT = 'postings_balanced';
    END IF;
    RETURN NULL;
END
$$;
