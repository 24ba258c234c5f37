-- The durable edge between the registry dataflow and the enrichment dataflow (see src/enrichment/queue.rs).
--
-- One job per company: the registry sink enqueues (or coalesces into) a company's job in the same
-- transaction as its writes and checkpoint; workers lease jobs with `for update skip locked`; the
-- enrichment sink removes a job in the transaction that commits its effects.
create table if not exists enrichment_jobs (
    job_id bigserial primary key,
    company_id bigint not null,
    tenant_id text,
    -- new, changed, stale, express, retry
    reason text not null,
    -- lower first: express 0, new and changed 100, retry 200, stale 300
    priority int not null,
    -- pending (waiting or leased) or parked (failed too often; `acraflow refresh --failed` re-queues it)
    state text not null default 'pending',
    not_before timestamptz not null default now(),
    -- failed attempts since the last success or change
    attempts int not null default 0,
    last_error text,
    lease_owner text,
    lease_expires_at timestamptz,
    -- bumped at every lease: the fencing token a worker must still hold to commit the job's effects
    lease_seq bigint not null default 0,
    -- bumped when a newer change or refresh coalesces into the job: a worker that leased an older version
    -- commits its result but leaves the job to run again
    version bigint not null default 0,
    -- PRD 02's per-job overrides: {"force": true, "max_pages": 2, "llm": false}
    overrides jsonb not null default '{}',
    enqueued_at timestamptz not null default now(),
    source_lsn pg_lsn,
    source_seq bigint,
    staging_id bigint,
    updated_at timestamptz not null default now()
);
create unique index if not exists enrichment_jobs_company_key on enrichment_jobs (company_id);
-- What a lease scans: waiting jobs in priority order, then age.
create index if not exists enrichment_jobs_queue_idx
    on enrichment_jobs (priority, enqueued_at, job_id) where state = 'pending';
create index if not exists enrichment_jobs_owner_idx on enrichment_jobs (lease_owner) where lease_owner is not null;

-- Spend per UTC day, shared by every worker: enrichments leased, LLM tokens. The daily caps
-- (ACRA_DIRECT_DAILY_CAP, OPENAI_DAILY_TOKENS_CAP) are checked against these rows under a row lock.
create table if not exists enrichment_usage (
    day date not null,
    kind text not null,
    used bigint not null default 0,
    primary key (day, kind)
);

-- An enrichment's history row comes from a job, not from a source position: it carries the job instead.
alter table company_enrichment_runs alter column source_lsn drop not null;
alter table company_enrichment_runs alter column source_seq drop not null;
alter table company_enrichment_runs add column if not exists job_id bigint;
alter table company_enrichment_runs add column if not exists job_lease bigint;
alter table company_enrichment_runs add column if not exists job_reason text;
alter table company_enrichment_runs add column if not exists enqueued_at timestamptz;
-- One history row per lease of a job, whatever happens to the worker (belt and braces: the lease fence
-- already makes a second commit impossible).
create unique index if not exists company_enrichment_runs_job_key
    on company_enrichment_runs (job_id, job_lease) where job_id is not null;

-- When a company was last enriched successfully (ok or degraded): what the stale sweeper reads.
do $$
begin
  if not exists (select 1 from information_schema.columns
                 where table_schema = current_schema() and table_name = 'companies' and column_name = 'enriched_at') then
    alter table companies add column enriched_at timestamptz;
    update companies c set enriched_at = h.last
      from (select company_id, max(updated_at) as last from company_enrichment_runs
            where enriched and status <> 'failed' group by company_id) h
      where c.company_id = h.company_id;
  end if;
end $$;
create index if not exists companies_enriched_at_idx on companies (enriched_at) where enriched_at is not null;

-- A run's enrichments (the worker's commits), beside the registry counters.
alter table enrichment_runs add column if not exists enriched bigint not null default 0;
