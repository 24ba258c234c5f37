-- The upsert target. `industry` is optional: created on a fresh database, never added to an existing table
-- (acraflow writes it only where it exists). Every other column acraflow writes is added when missing.
create table if not exists companies (
    company_id bigserial primary key,
    uen text unique,
    name text not null,
    industry_code text,
    industry_norm text,
    industry text,
    incorporation_year int,
    status text,
    website_domain text,
    about_text text,
    employees_est int,
    revenue_bucket text,
    linkedin_url text,
    hq_city text,
    hq_country text,
    last_seen timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

alter table companies add column if not exists uen text;
alter table companies add column if not exists industry_code text;
alter table companies add column if not exists industry_norm text;
alter table companies add column if not exists incorporation_year int;
alter table companies add column if not exists status text;
alter table companies add column if not exists website_domain text;
alter table companies add column if not exists about_text text;
alter table companies add column if not exists employees_est int;
alter table companies add column if not exists revenue_bucket text;
alter table companies add column if not exists linkedin_url text;
alter table companies add column if not exists hq_city text;
alter table companies add column if not exists hq_country text;
alter table companies add column if not exists last_seen timestamptz;
alter table companies add column if not exists created_at timestamptz not null default now();
alter table companies add column if not exists updated_at timestamptz not null default now();

-- The upsert's conflict targets. On a fresh table the first is the `unique` constraint's own index (same
-- name), so nothing is duplicated. The fallback key hashes the name so a long name cannot exceed the btree
-- entry limit.
create unique index if not exists companies_uen_key on companies (uen);
create unique index if not exists companies_name_year_key
    on companies (md5(lower(name)), coalesce(incorporation_year, 0)) where uen is null;
