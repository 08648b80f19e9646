-- The one definition of a balance, for one account (journal reads). Numeric, as ledger_balances (migration 0007).
CREATE OR REPLACE FUNCTION ledger_balance(account text, ledger text) RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT b.balance
      FROM ledger_balances(jsonb_build_array(jsonb_build_object('account', account, 'ledger', ledger))) b
$$;
