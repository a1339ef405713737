"""Operations: Prometheus metrics, the HTTP admin endpoint and KV events.

Self-contained modules the engine and the server call into; none imports the engine.

    metrics      CacheMetrics (server / embedded engine), ClientMetrics (client round trips)
    snapshot     the scrape-time gauges, read from a snapshot callable the owner registers
    status       the ``GET /status`` document (msgspec Structs; JSON schema in status.schema.json)
    admin_http   AdminServer: /metrics, /healthcheck, /status, /clear on a loopback HTTP port
    events       KV events (KvStored / KvRemoved) on a ZMQ PUB socket and an in-process buffer
    replay       TierState / replay(): what each tier holds, rebuilt from the events
    addresses    the loopback rule shared by the HTTP port and the event socket
"""
