"""``dspark-native serve``: an OpenAI-compatible HTTP server (:mod:`dspark_native.server`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .common import UserError, add_model_args, build_engine, build_plain_engine, command, load_drafter, load_target


def _model_name(args, target) -> str:
    if args.model_name:
        return args.model_name
    if target.embedded:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(args.target)) or "model"


@command("serve")
def _serve(parser: argparse.ArgumentParser):
    """Serve the OpenAI API (completions, chat, streaming) with continuous batching over HTTP."""
    from dspark_native.engine import POLICIES

    parser.description = (
        "Serve POST /v1/completions and /v1/chat/completions (stream: true for server-sent events), GET /v1/models, "
        "/health and /metrics (Prometheus). One engine thread steps a batch of up to --max-batch requests; "
        "requests join and leave between rounds, and a client that disconnects frees its slot. Default: the "
        "embedded SmolLM2-135M-Instruct with its shipped DSpark drafter on 127.0.0.1:8000."
    )
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    g.add_argument("--model-name", help="the model id clients use (default: the target's name)")
    g.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="max_tokens of a request that gives none (default 256, capped by the context)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a slot; more are answered 503 (default 256)",
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (default info: one access line per request)",
    )
    add_model_args(parser)
    d = parser.add_argument_group("engine")
    d.add_argument("--plain", action="store_true", help="plain decoding without a drafter (the baseline)")
    d.add_argument(
        "--policy",
        choices=POLICIES,
        default="causal",
        help="verification-length policy (default causal: verification depth adapts to the load)",
    )
    d.add_argument("--num-drafts", type=int, default=None, help="drafts per round (default: the drafter's block)")
    d.add_argument(
        "--sps-scope",
        choices=("round", "target"),
        default="round",
        help="what the causal / async policies' steps per second are of: round (default: the "
        "profiled forward plus the round's measured drafting time) or target (the table alone)",
    )
    d.add_argument("--threshold", type=float, default=0.5, help="survival threshold of --policy threshold")
    d.add_argument(
        "--sps",
        metavar="JSON",
        help="SPS table from `dspark-native profile-sps` (causal/async; "
        "default: profiled on the target at start-up, a few seconds)",
    )
    d.add_argument("--max-batch", type=int, default=8, help="concurrent requests in the batch (default 8)")
    d.add_argument("--max-seq", type=int, default=2048, help="context length per request (default 2048)")

    def run(args) -> int:
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise UserError(
                f"the server needs the 'serve' extra ({exc.name} is missing): "
                "pip install starlette uvicorn (scripts/setup.sh installs them)"
            ) from None
        from dspark_native import server

        if args.max_batch < 1 or args.max_seq < 2:
            raise UserError("--max-batch must be >= 1 and --max-seq >= 2")
        if args.num_drafts is not None and args.num_drafts < 1:
            raise UserError("--num-drafts must be >= 1")
        if args.default_max_tokens < 1 or args.max_queue < 0:
            raise UserError("--default-max-tokens must be >= 1 and --max-queue >= 0")
        if not 0 <= args.port <= 65535:
            raise UserError("--port must be in [0, 65535]")
        target = load_target(args)
        if args.plain:
            engine = build_plain_engine(args, target)
            drafter_name, policy = "none (plain decoding)", "none"
        else:
            drafter = load_drafter(args, target)
            if args.policy in ("causal", "async") and not args.sps:
                from dspark_native.engine import drafts_per_round

                need = args.max_batch * (drafts_per_round(drafter.model, args.num_drafts) + 1)
                print(
                    f"profiling the SPS table on the target (B = 1..{need} tokens; --sps JSON skips this)",
                    file=sys.stderr,
                    flush=True,
                )
                t0 = time.perf_counter()
                table = server.profile_sps_table(target.model, need)
                print(f"profiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
                engine = _engine_with_table(args, target, drafter.model, table)
            else:
                engine = build_engine(args, target, drafter.model)
            drafter_name, policy = drafter.name, args.policy
        info = dict(drafter=drafter_name, policy=policy, kind=engine.kind, max_batch=engine.max_batch)
        cfg = server.ServerConfig(
            model_name=_model_name(args, target), default_max_tokens=args.default_max_tokens, max_queue=args.max_queue
        )
        app = server.create_app(target, engine, cfg, info)
        try:
            sock = server.bind_socket(args.host, args.port)
        except OSError as exc:
            raise UserError(f"--host {args.host} --port {args.port}: cannot listen ({exc.strerror or exc})") from None
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        for line in server.format_startup(target, drafter_name, engine, policy, url):
            print(line, file=sys.stderr, flush=True)
        print(f"model id: {cfg.model_name}; Ctrl-C stops", file=sys.stderr, flush=True)
        import uvicorn

        config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: the normal way to stop
            pass
        print("stopped", file=sys.stderr)
        return 0

    return run


def _engine_with_table(args, target, drafter_model, table):
    from dspark_native import runtime

    try:
        return runtime.build_engine(
            target.model,
            drafter_model,
            policy=args.policy,
            threshold=args.threshold,
            sps_table=table,
            num_drafts=args.num_drafts,
            max_batch=args.max_batch,
            max_seq=args.max_seq,
            sps_scope=args.sps_scope,
        )
    except runtime.SetupError as exc:
        raise UserError(str(exc)) from None
