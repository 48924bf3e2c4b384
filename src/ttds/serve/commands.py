"""`ttds precompute` and `ttds serve`."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import typer

ModelOpt = typer.Option(..., "--model", help="A trained model folder (what `ttds train` wrote).")
DataOpt = typer.Option(..., "--data", help="The dataset the model was trained on.")
SeenOpt = typer.Option(True, "--exclude-seen/--keep-seen", help="Leave the user's history items out of the lists.")
QuantOpt = typer.Option("none", "--quantize", help="none | int8: dynamic int8 Linear layers of a generative model's LM (CPU; changes rankings).")
StoreOpt = typer.Option("sqlite:///runs/serve/cache.db", "--store", help="sqlite:///path.db or redis://127.0.0.1:6379/0")


def register(app: typer.Typer) -> None:
    @app.command("precompute")
    def precompute_cmd(
        model: Path = ModelOpt,
        data: str = DataOpt,
        k: int = typer.Option(50, "--k", min=1, max=100, help="Items cached per user."),
        store: str = StoreOpt,
        batch_size: int = typer.Option(256, "--batch-size", min=1, help="Users per model call."),
        device: str = typer.Option("cpu", "--device"),
        threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: torch's default)."),
        exclude_seen: bool = SeenOpt,
        quantize: str = QuantOpt,
    ):
        """Pre-compute every user's top-K into a store (resumable; published atomically when complete)."""
        from ttds.serve.engine import load_engine
        from ttds.serve.precompute import precompute
        from ttds.serve.store import open_store

        engine = load_engine(model, data, device, exclude_seen, threads, new_items=False, quantize=quantize)
        st = open_store(store)
        try:
            out = precompute(engine, st, k, batch_size)
        finally:
            st.close()
        typer.echo(json.dumps(out))

    @app.command("serve")
    def serve_cmd(
        model: Path = ModelOpt,
        data: str = DataOpt,
        store: Optional[str] = typer.Option(None, "--store", help="sqlite:///path.db or redis://127.0.0.1:6379/0 (none: online only)."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port", min=1, max=65535),
        max_batch: int = typer.Option(32, "--max-batch", min=1, help="Online requests per model call."),
        max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", min=0.0, help="How long a request waits for others to batch with."),
        device: str = typer.Option("cpu", "--device"),
        threads: int = typer.Option(1, "--threads", min=0, help="torch threads for online generation (0: torch's default)."),
        exclude_seen: bool = SeenOpt,
        quantize: str = QuantOpt,
    ):
        """Run the recommendation API (OpenAPI schema at /docs and /openapi.json)."""
        import uvicorn

        from ttds.serve.app import create_app
        from ttds.serve.engine import load_engine
        from ttds.serve.store import open_store

        engine = load_engine(model, data, device, exclude_seen, threads, quantize=quantize)
        app = create_app(engine, open_store(store) if store else None, max_batch=max_batch, max_wait_ms=max_wait_ms)
        # The dataset and model are ~10^5 long-lived Python objects (Games: 185k): a full garbage collection
        # walks them all (60-170 ms, the max of the cached-path latency). Freeze them out of the collector.
        gc.collect()
        gc.freeze()
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
