-- What an enrichment found, on its history row (one per enrichment, keyed by source position like every
-- history row). `enriched` tells enrichment rows from registry-only ones; the daily cap counts them.
alter table company_enrichment_runs add column if not exists enriched boolean not null default false;
alter table company_enrichment_runs add column if not exists website_domain text;
alter table company_enrichment_runs add column if not exists about_text text;
alter table company_enrichment_runs add column if not exists public_emails jsonb;
alter table company_enrichment_runs add column if not exists phones jsonb;
alter table company_enrichment_runs add column if not exists tech_stack jsonb;
alter table company_enrichment_runs add column if not exists jobs_count int;
alter table company_enrichment_runs add column if not exists linkedin_url text;
alter table company_enrichment_runs add column if not exists employees_est int;
alter table company_enrichment_runs add column if not exists revenue_bucket text;
alter table company_enrichment_runs add column if not exists pages_fetched int;
alter table company_enrichment_runs add column if not exists duration_ms int;
alter table company_enrichment_runs add column if not exists llm_tokens bigint;
alter table company_enrichment_runs add column if not exists corpus text;
create index if not exists company_enrichment_runs_enriched_day
    on company_enrichment_runs (updated_at) where enriched;

-- People at a company, from the optional contacts endpoint (ENABLE_APIFY_LINKEDIN).
create table if not exists contacts (
    id bigserial primary key,
    company_id bigint not null,
    name text not null,
    title text,
    linkedin_url text,
    email text,
    updated_at timestamptz not null default now()
);
create unique index if not exists contacts_person_key on contacts (company_id, lower(name), coalesce(title, ''));
