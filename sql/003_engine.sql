-- SSIC 2020 reference (Singapore Department of Statistics); rows are loaded by `acraflow migrate`.
create table if not exists ssic_ref (
    code text primary key,
    title text not null,
    level text,
    section text
);

-- One header per run of a pipeline.
create table if not exists enrichment_runs (
    run_id bigserial primary key,
    tenant_id text,
    mode text,
    pipeline text,
    checkpoint_key text,
    status text not null default 'running',
    started_at timestamptz not null default now(),
    ended_at timestamptz,
    rows_in bigint not null default 0,
    processed bigint not null default 0,
    filtered bigint not null default 0,
    skipped bigint not null default 0,
    failed bigint not null default 0,
    dead_lettered bigint not null default 0,
    error text
);

-- One history row per processed change, keyed by its source position so a replay adds nothing.
create table if not exists company_enrichment_runs (
    id bigserial primary key,
    run_id bigint,
    company_id bigint not null,
    source_lsn pg_lsn not null,
    source_seq bigint not null,
    staging_id bigint,
    status text not null default 'ok',
    error text,
    updated_at timestamptz not null default now()
);
create unique index if not exists company_enrichment_runs_position_key
    on company_enrichment_runs (source_lsn, source_seq);
create index if not exists company_enrichment_runs_company_idx
    on company_enrichment_runs (company_id, updated_at desc);

-- The checkpoint. `last_id` is what the PRD's service kept; the other columns let the stream and the
-- uen-ordered backfill resume exactly.
create table if not exists service_progress (
    key text primary key,
    last_id bigint,
    last_lsn pg_lsn,
    updated_at timestamptz not null default now()
);
alter table service_progress add column if not exists last_seq bigint;
alter table service_progress add column if not exists last_uen text;
alter table service_progress add column if not exists cursor text;

-- Optional: scores computed downstream; acraflow never requires it.
create table if not exists lead_scores (
    company_id bigint primary key,
    score numeric,
    reasons jsonb,
    updated_at timestamptz not null default now()
);

-- Rows acraflow could not process, with the stage and the reason (naming the field).
create table if not exists dead_letters (
    id bigserial primary key,
    run_id bigint,
    source_lsn pg_lsn not null,
    source_seq bigint not null,
    staging_id bigint,
    uen text,
    stage text not null,
    reason text not null,
    row jsonb,
    created_at timestamptz not null default now()
);
create unique index if not exists dead_letters_position_key on dead_letters (source_lsn, source_seq, stage);
