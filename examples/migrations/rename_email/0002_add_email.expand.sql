-- Renaming users.mail to users.email without downtime, expand half.
--
-- A plain `ALTER TABLE users RENAME COLUMN mail TO email` would break v1 (still serving, and
-- the rollback target) the moment it commits. Instead, in expand/contract steps:
--
--   1. add the new column            (this file)
--   2. write both columns            (this file: a trigger, so neither app version must know)
--   3. backfill old rows             (this file)
--   4. switch reads and writes       (no SQL: deploy v2, which uses only `email`)
--   5. drop the old column           (0003_drop_mail.contract.sql, once nothing can roll back to v1)
--
-- After this file, v1 (reads and writes `mail`) and v2 (reads and writes `email`) run side by
-- side on the same rows, which is what a blue-green switch and a rollback need.

-- Fail fast instead of queueing: an ALTER TABLE waiting for its lock behind a long transaction
-- blocks every later query on the table. 5 s then an error (retry later) beats an outage.
-- statement_timeout bounds the whole file's statements, the backfill included (raise it for a
-- big table, or better, batch the backfill; see step 3). LOCAL: only for this file's transaction.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '1min';

-- Step 1: the new column. Nullable and without a default, so PostgreSQL only updates the
-- catalog: no table rewrite, no scan, the ACCESS EXCLUSIVE lock is held only for an instant
-- (but until this transaction commits, see the note on the backfill below).
ALTER TABLE users ADD COLUMN email text;

-- Step 2: write both. Whichever column an app version writes, the trigger copies it to the
-- other one, on INSERT and on UPDATE, so rows written by v1 are complete for v2 and vice versa.
-- If a statement sets both columns (an app that already writes both), it is left alone.
CREATE FUNCTION users_sync_mail_email() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.email IS NULL THEN
            NEW.email := NEW.mail;        -- v1 inserted
        ELSIF NEW.mail IS NULL THEN
            NEW.mail := NEW.email;        -- v2 inserted
        END IF;
    ELSIF NEW.email IS DISTINCT FROM OLD.email AND NEW.mail IS NOT DISTINCT FROM OLD.mail THEN
        NEW.mail := NEW.email;            -- v2 (or the backfill) updated email
    ELSIF NEW.mail IS DISTINCT FROM OLD.mail AND NEW.email IS NOT DISTINCT FROM OLD.email THEN
        NEW.email := NEW.mail;            -- v1 updated mail
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_sync_mail_email
    BEFORE INSERT OR UPDATE OF mail, email ON users
    FOR EACH ROW EXECUTE FUNCTION users_sync_mail_email();

-- Step 3: backfill the rows written before the trigger existed. The trigger is already in
-- place, so nothing written from now on can be missed.
--
-- Locking: this file runs in one transaction, so the ALTER TABLE's ACCESS EXCLUSIVE lock is
-- held until the backfill commits, and reads and writes of `users` wait meanwhile. Fine for a
-- small table (this example). For a large one, move the backfill to its own expand file (row
-- locks only, the table stays available) and update in batches, e.g. by id ranges,
--     UPDATE users SET email = mail WHERE email IS NULL AND id BETWEEN 1 AND 10000;
-- one transaction per batch, so each batch's row locks are short.
UPDATE users SET email = mail WHERE email IS NULL AND mail IS NOT NULL;

-- Step 4 is not SQL: deploy v2 (reads and writes `email`) with the blue-green switch. v1 keeps
-- working until it is gone, and a rollback to v1 works too, because `mail` is still maintained.
