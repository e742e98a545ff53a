-- Renaming users.mail to users.email, contract half (step 5).
--
-- Breaks v1: after this file, v1's queries on `mail` fail. That is why the control plane runs
-- contract files only once no environment that may still run (or be rolled back to) a version
-- needing `mail` is live, draining or in standby.

SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '1min';

-- Stop writing both: v2 writes `email` only, nothing reads `mail` any more.
DROP TRIGGER users_sync_mail_email ON users;
DROP FUNCTION users_sync_mail_email();

-- Drop the old column. Catalog-only in PostgreSQL (the space is reclaimed by later rewrites),
-- so the ACCESS EXCLUSIVE lock is brief; lock_timeout above keeps it from queueing for long.
ALTER TABLE users DROP COLUMN mail;
