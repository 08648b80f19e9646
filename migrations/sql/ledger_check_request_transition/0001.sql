-- A request moves only forward through its lifecycle, what it is about never changes, and it is never deleted.
CREATE OR REPLACE FUNCTION ledger_check_request_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'requests are never deleted' USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF (NEW.request_id, NEW.kind, NEW.user_id, NEW.token_id, NEW.token_limited, NEW.group_name, NEW.model,
        NEW.prompt_tokens, NEW.max_tokens, NEW.amount, NEW.trusted, NEW.model_ratio, NEW.completion_ratio,
        NEW.group_ratio, NEW.model_price, NEW.request_fingerprint, NEW.created_at, NEW.expires_at)
       IS DISTINCT FROM
       (OLD.request_id, OLD.kind, OLD.user_id, OLD.token_id, OLD.token_limited, OLD.group_name, OLD.model,
        OLD.prompt_tokens, OLD.max_tokens, OLD.amount, OLD.trusted, OLD.model_ratio, OLD.completion_ratio,
        OLD.group_ratio, OLD.model_price, OLD.request_fingerprint, OLD.created_at, OLD.expires_at) THEN
        RAISE EXCEPTION 'request %: only its resolution may change', OLD.request_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NOT ((OLD.status = 'open' AND NEW.status IN ('settled', 'refunded', 'expired'))
            OR (OLD.status = 'expired' AND NEW.status = 'settled' AND NEW.late)) THEN
        RAISE EXCEPTION 'request %: % -> % is not a lifecycle step', OLD.request_id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$;
