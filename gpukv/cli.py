"""The ``gpukv`` command: ``gpukv demo`` and ``gpukv serve``."""

from __future__ import annotations

import argparse
import logging
import sys


def _size(text: str) -> int:
    """Parse ``4GiB``, ``512MiB``, ``1e9`` or a plain byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    low = text.strip().lower()
    for unit, scale in units.items():
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * scale)
    try:
        return int(float(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None


def _positive(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_size(text: str) -> int:
    value = _size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from gpukv.frontend.session import Limits

    limits = Limits()
    parser = argparse.ArgumentParser(prog="gpukv", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the store/lookup/retrieve lifecycle end to end")
    demo.add_argument("--kind", choices=["mla", "mha", "both"], default="both")
    demo.add_argument("--tp", type=int, default=None,
                      help="tensor-parallel size (default 2; with --vllm 1)")
    demo.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    demo.add_argument("--layers", type=int, default=8, help="layers (default 8, scaled down)")
    demo.add_argument("--chunk-size", type=int, default=256)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    demo.add_argument("--server", action="store_true", help="run through a spawned gpukv server")
    demo.add_argument("--model", choices=["tiny-deepseek", "tiny-llama"], default=None,
                      help="run the real-model prefix-reuse scenario instead (needs transformers)")
    demo.add_argument("--vllm", action="store_true",
                      help="a tiny model served by vLLM with gpukv's connector: a fresh engine reuses "
                           "a prefix from gpukv (needs vLLM; --tokens sets the prompt length)")

    serve = sub.add_parser("serve", help="run the cache server for the workers of this machine")
    serve.add_argument("--address", default=None,
                       help="ipc:///path (default: ipc://$XDG_RUNTIME_DIR/gpukv.sock, else "
                            "ipc:///tmp/gpukv-<uid>/gpukv.sock, else, when another user holds "
                            "that folder, ~/.cache/gpukv/run/gpukv.sock) or tcp://127.0.0.1:PORT")
    serve.add_argument("--capacity", type=_size, default=_size("4GiB"),
                       help="L1 bytes per device (default 4GiB)")
    serve.add_argument("--device", default=None,
                       help="one arena on cpu, cuda:N or cuda-uuid:<uuid> (default: every GPU "
                            "this process sees, else cpu)")
    serve.add_argument("--devices", default=None,
                       help="comma-separated arenas, one per device: cuda:0,cuda:1, or 'all' (every "
                            "visible GPU); CPU: cpu:0,cpu:1 stand for devices; default: --device")
    serve.add_argument("--chunk-size", type=int, default=256)
    serve.add_argument("--disk-dir", default=None)
    serve.add_argument("--disk-capacity", type=_size, default=None)
    serve.add_argument("--remote-url", default=None, help="redis:// or rediss:// URL of a shared tier")
    serve.add_argument("--worker-timeout", type=float, default=30.0,
                       help="seconds without a ping before a worker is reaped (default 30)")
    serve.add_argument("--orphan-hold", type=float, default=600.0,
                       help="seconds a reaped client's copies in flight stay pinned when the "
                            "server cannot watch its process (tcp://, another pid namespace; "
                            "default 600)")
    serve.add_argument("--threads", type=int, default=4,
                       help="pool threads for long requests (tier lookups, large ones, stats, flush)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a tcp:// bind on a non-loopback address (CURVE: only holders "
                            "of the key file connect; the HTTP endpoint needs --admin-token)")
    serve.add_argument("--key-file", default=None,
                       help="CURVE key file of tcp:// addresses (server and --events; default "
                            "$GPUKV_KEY_FILE, else gpukv.keys in the runtime folder, created 0600)")
    serve.add_argument("--allow-abstract", action="store_true",
                       help="allow an abstract ipc://@name socket (no file permissions!)")
    serve.add_argument("--flush-timeout", type=float, default=5.0,
                       help="seconds to flush queued spills at shutdown (default 5)")
    serve.add_argument("--prefault", choices=["background", "sync", "off"], default="background",
                       help="fault the arenas' pages in at start: in a thread while serving "
                            "(default), before serving, or not at all")
    serve.add_argument("--http-port", type=int, default=None,
                       help="serve /healthcheck, and with a token /metrics, /status and POST "
                            "/clear, on this port")
    serve.add_argument("--http-token-file", default=None,
                       help="file of the bearer token /metrics, /status and POST /clear need "
                            "(default gpukv-admin.token in the runtime folder, created 0600)")
    serve.add_argument("--http-host", default="127.0.0.1",
                       help="host of the HTTP admin endpoint (loopback unless --allow-remote)")
    serve.add_argument("--events", default=None, metavar="ADDRESS",
                       help="publish KV events (typed msgpack) on a ZMQ PUB socket there "
                            "(ipc:// or loopback tcp://)")
    serve.add_argument("--vllm-events", default=None, metavar="ADDRESS",
                       help="publish what the cache holds as vLLM blocks, in vLLM's KV-event wire "
                            "format, on a ZMQ PUB socket there (ipc:// or loopback tcp://), for "
                            "KV-aware routers; vLLM engines with the gpukv connector describe "
                            "their blocks to the server")
    serve.add_argument("--vllm-events-topic", default="", metavar="TOPIC",
                       help="the topic frame of --vllm-events messages (default empty)")
    bounds = serve.add_argument_group("bounds on clients (past one, a request gets a Busy reply "
                                      "and changes nothing)")
    bounds.add_argument("--max-instances", type=_positive, default=limits.max_instances,
                        help=f"registered KV instances (default {limits.max_instances})")
    bounds.add_argument("--max-open-requests", type=_positive, default=limits.max_open_requests,
                        help=f"looked-up requests not yet ended (default {limits.max_open_requests})")
    bounds.add_argument("--max-plans", type=_positive, default=limits.max_plans,
                        help=f"stores and retrieves in flight (default {limits.max_plans})")
    bounds.add_argument("--max-reserved", type=_positive_size, default=None,
                        help="bytes of stores in flight per client process, its reaped sessions' "
                             "still held ones included (default: half of one device's "
                             "--capacity)")
    bounds.add_argument("--max-sessions", type=_positive, default=limits.max_sessions,
                        help=f"client sessions server-wide (default {limits.max_sessions}; past "
                             "it, the least recently seen empty one is closed first)")
    bounds.add_argument("--max-sessions-per-process", type=_positive,
                        default=limits.max_sessions_per_process,
                        help=f"client sessions per client process (default "
                             f"{limits.max_sessions_per_process})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        if args.vllm:
            from gpukv.testing.vllm_demo import run_vllm_demo

            return run_vllm_demo(num_tokens=args.tokens, tp=args.tp or 1)
        if args.model is not None:
            from gpukv.testing.prefix_reuse import run_demo as run_model_demo

            return run_model_demo(args.model, server=args.server)
        from gpukv.demo import run_demo

        return run_demo(kinds=["mla", "mha"] if args.kind == "both" else [args.kind], tp_size=args.tp or 2,
                        num_tokens=args.tokens, num_layers=args.layers, chunk_size=args.chunk_size,
                        device=args.device, server=args.server)
    if args.command == "serve":
        from gpukv.frontend.serve import serve_main

        return serve_main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
