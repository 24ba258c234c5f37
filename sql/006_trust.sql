-- Inferred facts carry their evidence (see src/enrichment/enrich/verify.rs): a website is stored with how
-- sure the verifier is that it is the company's own, the evidence it found, and where the candidate came
-- from (known, search, probe). A company whose best candidate falls short of ENRICH_MIN_CONFIDENCE gets
-- no website at all, and nothing read from one.
alter table companies add column if not exists domain_confidence real;
alter table companies add column if not exists domain_evidence jsonb;
alter table companies add column if not exists domain_source text;
alter table companies add column if not exists hq_postal_code text;

alter table company_enrichment_runs add column if not exists domain_confidence real;
alter table company_enrichment_runs add column if not exists domain_evidence jsonb;
alter table company_enrichment_runs add column if not exists domain_source text;
alter table company_enrichment_runs add column if not exists hq_postal_code text;
-- What the crawl worked around: an https site read over http, a meta refresh, the reader, a refused result.
alter table company_enrichment_runs add column if not exists notes jsonb;
