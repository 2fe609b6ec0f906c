"""The `runtime` command: thin argument parsing over the library (serve, generate, schedulers)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from runtime.config import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    DTYPES,
    KV_CACHE_DTYPES,
    LINEAR_BACKENDS,
    ConfigError,
    RuntimeConfig,
    build_config,
)
from runtime.hardware import keep_freed_memory, set_openmp_defaults

if TYPE_CHECKING:  # torch is imported after `set_openmp_defaults`
    from runtime.request import Request


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every subcommand that builds an engine (defaults: docs/configuration.md)."""
    d = RuntimeConfig()
    p.add_argument("--config", help="YAML file whose keys are these long option names")
    p.add_argument("--scheduler", help=f"scheduler entry-point name (default {d.scheduler})")
    p.add_argument("--dtype", choices=DTYPES, help="weights and activations dtype (default auto)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, help=f"max running requests (default {d.max_num_seqs})")
    p.add_argument("--kv-cache-memory",
                   help="KV cache budget: auto, a fraction of available memory (0.4) or a size "
                        "(4GiB) (default auto = 0.4)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="KV cache storage: auto (the model's dtype), or bfloat16/float16 under "
                        "a float32 model (half the KV memory, rounded keys and values)")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="KV capacity in tokens; overrides --kv-cache-memory")
    p.add_argument("--linear-backend", choices=LINEAR_BACKENDS,
                   help="GEMM kernels: auto (measured at startup), torch, or prepacked: onednn, mkl, native")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   help="decode attention: auto (the native kernel on CPU where it builds), "
                        "native or sdpa")
    p.add_argument("--compile", nargs="?", const=True, type=compile_flag, metavar="MODE",
                   help="run the decoder as one torch.compile graph: alone or `true` compiles "
                        "at startup (35 s to two minutes), `background` while serving eagerly "
                        "(docs/configuration.md); default false")
    p.add_argument("--static-decode-rows", type=int, nargs="+", metavar="N",
                   help="with --compile: also compile the decoder for these fixed row counts "
                        "(such as 1 2 4 8) with frozen, autotuned GEMMs; passes of up to the "
                        "largest run padded to the next one (docs/configuration.md)")
    p.add_argument("--static-graph-cache", type=graph_cache_flag, metavar="DIR",
                   help="where the --static-decode-rows graphs are kept between starts: a "
                        "directory, true (default: $BATON_RUNTIME_CACHE/static-graphs) or false")
    p.add_argument("--seed", type=int, help="global seed for unseeded sampling (default 0)")
    p.add_argument("--num-threads", type=int,
                   help="torch CPU threads (default: one per physical core)")


def graph_cache_flag(text: str) -> bool | str:
    """`--static-graph-cache`: true/false as booleans, anything else a directory."""
    return {"true": True, "false": False}.get(text.lower(), text)


def compile_flag(text: str) -> bool | str:
    """`--compile MODE`: true/false as booleans, background as itself."""
    value = {"true": True, "false": False}.get(text.lower(), text.lower())
    if value not in (True, False, *COMPILE_MODES):
        raise argparse.ArgumentTypeError(
            f"expected true, false or background, got {text!r}")
    return value


def engine_overrides(args: argparse.Namespace) -> dict:
    keys = ("scheduler", "dtype", "device", "max_model_len", "max_num_seqs", "kv_cache_tokens",
            "kv_cache_memory", "kv_cache_dtype", "linear_backend", "attention_backend", "compile",
            "static_decode_rows", "static_graph_cache", "seed", "num_threads")
    out = {k: getattr(args, k, None) for k in keys}
    if getattr(args, "model", None):
        out["model"] = args.model
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from runtime.bootstrap import create_engine
    from runtime.sampling_params import SamplingParams

    config = build_config(args.config, engine_overrides(args))
    prompts: list[tuple[str, int | None]] = [(p, None) for p in args.prompt or []]
    if args.prompts_file:
        with open(args.prompts_file) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    prompts.append((str(obj["prompt"]), obj.get("max_tokens")))
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ConfigError(f"{args.prompts_file}:{lineno}: expected an object with "
                                      f"'prompt' ({exc})") from None
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT or --prompts-file FILE.jsonl")
    engine = create_engine(config)
    reqs = []
    for i, (prompt, max_tokens) in enumerate(prompts):
        seed = None if args.seed is None else args.seed + i
        params = SamplingParams(max_tokens=max_tokens or args.max_tokens,
                                temperature=args.temperature, seed=seed,
                                ignore_eos=args.ignore_eos)
        reqs.append(engine.add_request(prompt, params))
    while engine.has_unfinished():
        engine.step()
    return print_completions(reqs, args.json)


def print_completions(reqs: Sequence[Request], as_json: bool) -> int:
    """Each completion on stdout, each failure's error on stderr; 1 if any request failed."""
    for i, req in enumerate(reqs):
        record = {"prompt": req.prompt, "text": req.output_text, "token_ids": req.output_token_ids,
                  "finish_reason": req.finish_reason.value if req.finish_reason else None,
                  "error": req.error}
        print(json.dumps(record) if as_json else f"{req.prompt}{req.output_text}\n")
        if req.error is not None:
            print(f"error: prompt {i + 1} ({req.request_id}) failed: {req.error}", file=sys.stderr)
    failed = sum(req.error is not None for req in reqs)
    if failed:
        print(f"error: {failed} of {len(reqs)} requests failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.server.app import run_server

    keys = ("host", "port", "served_model_name", "max_queued_requests", "shutdown_timeout")
    keys += ("chat_template", "log_requests", "log_interval", *SERVER_LIMITS)
    keys += ("api_key", "api_key_all_routes", "allowed_hosts")
    keys += ("replicas", "prefill_workers", "ray_address")
    config = build_config(args.config, engine_overrides(args) | {k: getattr(args, k) for k in keys})
    config_json = json.dumps(config.redacted(), default=str)
    logging.getLogger("runtime.server").info("effective config: %s", config_json)
    return run_server(config)


def cmd_schedulers(args: argparse.Namespace) -> int:
    from runtime.plugins import ENTRY_POINT_GROUP, describe_schedulers

    rows = describe_schedulers()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no schedulers installed (entry-point group {ENTRY_POINT_GROUP!r})")
        return 0
    table = [("NAME", "PACKAGE", "VERSION", "OBJECT", "HOOKS")]
    for r in rows:
        hooks = f"failed to import: {r['error']}" if "error" in r else ", ".join(r["hooks"])
        table.append((r["name"], r["package"], r["version"], r["object"], hooks or "(none)"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4])
    return 0


SERVER_LIMITS = {  # key: (type, help); defaults are RuntimeConfig's (docs/serving.md)
    "max_request_body_bytes": (int, "larger request bodies get 413"),
    "max_prompt_chars": (int, "prompt characters per request, checked before tokenizing"),
    "max_choices_per_request": (int, "prompts x n per request (also bounded by the queue)"),
    "max_stop_strings": (int, "stop strings per request"),
    "max_stop_string_chars": (int, "characters per stop string"),
    "limit_concurrency": (int, "open connections; at the limit new requests get 503"),
    "keep_alive_timeout": (float, "seconds an idle connection stays open"),
    "header_timeout": (float, "seconds for a request's line and headers to arrive"),
    "body_timeout": (float, "seconds for a request's whole body to arrive (else 408)"),
}


def add_server_limits(p: argparse.ArgumentParser) -> None:
    d = RuntimeConfig()
    for key, (typ, text) in SERVER_LIMITS.items():
        option = "--" + key.replace("_", "-")
        p.add_argument(option, type=typ, help=f"{text} (default {getattr(d, key):g})")


def add_access_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: "
                                     "$RUNTIME_API_KEY, else no key)")
    p.add_argument("--api-key-all-routes", action="store_true", default=None,
                   help="also require the key on /metrics and the docs pages (/health stays open)")
    p.add_argument("--allowed-hosts", help="comma-separated Host names to answer, or * for any "
                                           "(default: loopback names when bound to loopback)")


def add_scale_out_options(p: argparse.ArgumentParser) -> None:
    """Ray options (docs/scale-out.md); without --replicas the server is one process."""
    p.add_argument("--replicas", type=int,
                   help="engine replicas on Ray behind this server, routed by load (default: "
                        "none, one process without Ray); needs the `ray` extra")
    p.add_argument("--prefill-workers", type=int,
                   help="prefill workers on Ray computing prompts' K/V for the replicas "
                        "(default 0; needs --replicas and a layout with insert_prefilled)")
    p.add_argument("--ray-address",
                   help="join this Ray cluster (as ray.init's address); default: start a "
                        "local Ray instance")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run prompts offline and print the completions")
    gen.add_argument("--model", help="Hugging Face model folder (default: the demo model)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="JSONL, one {\"prompt\", \"max_tokens\"?} per line")
    gen.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_engine_options(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    srv.add_argument("model", nargs="?", help="Hugging Face model folder (default: the demo model)")
    srv.add_argument("--host", help="bind address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default 8000)")
    srv.add_argument("--served-model-name", help="the `model` clients send (default: folder name)")
    queue_help = "waiting requests before new ones get 503 (default 1024)"
    srv.add_argument("--max-queued-requests", type=int, help=queue_help)
    drain_help = "seconds to drain in-flight requests on SIGTERM (default 30)"
    srv.add_argument("--shutdown-timeout", type=float, help=drain_help)
    srv.add_argument("--chat-template", help="Jinja template file or text (overrides the model's)")
    log_help = "log every request, and the access log"
    srv.add_argument("--log-requests", action="store_true", default=None, help=log_help)
    srv.add_argument("--log-interval", type=float,
                     help="seconds between throughput log lines while busy (default 10)")
    add_server_limits(srv)
    add_access_options(srv)
    add_scale_out_options(srv)
    add_engine_options(srv)
    srv.set_defaults(func=cmd_serve)

    sch = sub.add_parser("schedulers", help="list installed scheduler plugins")
    sch.add_argument("--json", action="store_true", help="JSON output")
    sch.set_defaults(func=cmd_schedulers)

    add_bench_parser(sub)  # `runtime bench` and `runtime bench serve`: cmd_bench below
    return parser


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`runtime bench`: its options and commands live in runtime/bench/main.py."""
    from runtime.bench.main import add_bench_parser as add

    add(sub).set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Offline comparison in process, `bench serve` against OpenAI-compatible servers, or
    `bench compare` of earlier results."""
    from runtime.bench.main import run_compare_cli, run_offline_cli, run_online_cli

    if args.bench_mode == "compare":
        return run_compare_cli(args)
    return run_online_cli(args) if args.bench_mode == "serve" else run_offline_cli(args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    runs_a_model = args.func in (cmd_generate, cmd_serve, cmd_bench)
    # Before anything imports torch: libgomp reads its environment when it loads.
    openmp = set_openmp_defaults(measure=runs_a_model)
    if runs_a_model:  # before any thread takes a malloc arena of its own (see the function)
        keep_freed_memory()
    logging.getLogger("runtime").info("OpenMP: %s", openmp)
    try:
        return args.func(args)
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
