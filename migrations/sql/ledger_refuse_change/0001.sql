-- History is append-only: corrections are reversing entries, never edits. Every trigger that refuses a change
-- outright (an update, a delete or a truncate) runs this.
CREATE OR REPLACE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'post a reversing entry instead';
END
$$;
