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

-- Exports to Odoo (the export step): one durable job per company scored at or above SCORE_MIN_EXPORT,
-- leased with SKIP LOCKED; what Odoo returned is kept so a later export updates.
create table if not exists odoo_exports (
    company_id bigint primary key,
    state text not null default 'pending',      -- pending, done, parked
    version bigint not null default 1,          -- bumped by every enrichment that asks for an export
    attempts int not null default 0,
    not_before timestamptz not null default now(),
    lease_owner text,
    lease_expires_at timestamptz,
    lease_seq bigint not null default 0,
    partner_id bigint,                          -- res.partner id in Odoo
    lead_id bigint,                             -- crm.lead id in Odoo
    last_error text,
    exported_at timestamptz,
    tenant_id text default current_setting('request.tenant_id', true),
    updated_at timestamptz not null default now()
);
create index if not exists odoo_exports_due on odoo_exports (not_before) where state = 'pending';
