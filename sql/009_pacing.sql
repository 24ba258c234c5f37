-- Providers whose limit is per account, not per machine (ZeroBounce's validatebatch: 5 calls a minute, and
-- a key past it is blocked for 10 minutes; Odoo's external API): every worker takes the next free slot
-- here, so the calls of all workers together keep the configured spacing.
create table if not exists provider_pacing (
    provider text primary key,
    next_at timestamptz not null
);
