"""The front end: the ZMQ wire protocol, the ``gpukv serve`` server and its client sessions, and
the :class:`CacheClient` workers use."""
