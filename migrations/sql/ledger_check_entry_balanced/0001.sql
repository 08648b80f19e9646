-- Every entry balances per ledger. Checked at commit, once all postings of the transaction are in: the deferred
-- trigger postings_balanced runs this once per posting. From 0003 on, ledger_check_posted_entries checks once per
-- posting statement instead.
CREATE OR REPLACE FUNCTION ledger_check_entry_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    offender record;
BEGIN
    SELECT ledger, sum(amount) AS total INTO offender
      FROM postings WHERE entry_id = NEW.entry_id
     GROUP BY ledger HAVING sum(amount) <> 0
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'entry % does not balance: ledger % sums to %', NEW.entry_id, offender.ledger, offender.total
            USING ERRCODE = 'check_violation', CONSTRAINT = 'postings_balanced';
    END IF;
    RETURN NULL;
END
$$;
