"""Tiers below L1: a safetensors disk tier (``disk``), a Redis/Valkey tier shared by many
machines (``remote``, its connection in ``remote_link``, URLs in ``redis_url``), the
self-describing value format both use (``codec``), and what they share: one background writer
(``writer``), tier events (``events``), one-round-trip fetching of a lookup's run (``fetch``),
private files (``private_files``) and rate-limited warnings (``ratelimit``)."""
