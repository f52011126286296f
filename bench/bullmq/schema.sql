-- The status table of the BullMQ + PostgreSQL variant (run.mjs --pg-url applies this first).
-- One row per (event, user, channel): inserted as 'queued' by the fan-out, one multi-row INSERT
-- per event, before the delivery jobs exist; updated to 'sent' (or 'failed') with the provider's
-- reply by group-committed UPDATEs before each delivery job completes.
CREATE TABLE IF NOT EXISTS deliveries (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    event_id text NOT NULL,
    event_type text NOT NULL,
    user_id text NOT NULL,
    channel text NOT NULL,
    status text NOT NULL,  -- queued, sent, failed
    attempts integer NOT NULL DEFAULT 0,
    provider_message_id text,
    provider_reply text,  -- the reply's body, at most 500 characters
    http_status integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    CONSTRAINT pk_deliveries PRIMARY KEY (id),
    CONSTRAINT uq_deliveries_event_id_user_id_channel UNIQUE (event_id, user_id, channel)
);
