-- Leads (issue: from enriched companies to leads): email verification, lead features and scores.

-- Each email verified once per ZEROBOUNCE_RECHECK_DAYS: the provider is never paid twice within it.
create table if not exists email_verification_cache (
    email text primary key,          -- lower case
    status text not null,            -- valid, invalid, catch-all, unknown, spamtrap, abuse, do_not_mail
    sub_status text not null default '',
    checked_at timestamptz not null default now()
);

-- The emails of an enrichment with their verification status: [["sales@x.sg", "valid"], ...].
alter table company_enrichment_runs add column if not exists email_status jsonb;
alter table contacts add column if not exists email_status text;

-- The feature vector a score was computed from, per company (and tenant, as every acraflow write).
create table if not exists lead_features (
    company_id bigint primary key,
    features jsonb not null,
    tenant_id text default current_setting('request.tenant_id', true),
    computed_at timestamptz not null default now()
);

-- lead_scores (003) gains its bucket, rationale and tenant.
alter table lead_scores add column if not exists bucket text;
alter table lead_scores add column if not exists rationale text;
alter table lead_scores add column if not exists tenant_id text default current_setting('request.tenant_id', true);
create index if not exists lead_scores_bucket on lead_scores (bucket, score desc);
