"""Scale-out on Ray: engine replicas and a prefill pool behind the one OpenAI front end.

`runtime serve --replicas N [--prefill-workers M] [--ray-address ADDR]` (docs/scale-out.md).
The FastAPI server stays the front end (validation, errors, SSE, limits, API key unchanged);
requests go to Ray actors, each replica its own engine, model, scheduler and KV cache:

- `protocol`: the plain data crossing process boundaries (request specs, output deltas, load).
- `replica`: `ReplicaServer`, one engine on its step thread inside an actor.
- `prefill_pool`: `PrefillServer` (a worker computing prompts' K/V) and the front's pool of them.
- `router`: which replica takes a request, by load.
- `pool`: `ReplicaPool`, the server's backend: routing, streaming, faults, health, drain.
- `metrics`: the front's own series and the replicas' merged under a `replica` label.
- `cluster`: everything that names Ray: connecting, actor options, launching, tearing down.
- `frontend`: the app (`create_distributed_app`) and the front's tokenizer-only request maker.

Nothing under `runtime/` imports this package unless `replicas` is set, so Ray stays optional.
"""
