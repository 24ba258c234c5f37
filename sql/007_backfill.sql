-- The snapshot of the backfill that left an id checkpoint at the end of the table: the next backfill also
-- reads the rows at or below that id which the snapshot could not see (see src/source/backfill.rs).
alter table service_progress add column if not exists snapshot text;
