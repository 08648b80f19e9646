-- A token never changes user (nor id): the registry may update a token's other columns, never its owner.
CREATE OR REPLACE FUNCTION ledger_check_token_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.user_id <> OLD.user_id OR NEW.token_id <> OLD.token_id THEN
        RAISE EXCEPTION 'token % never changes user', OLD.token_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
