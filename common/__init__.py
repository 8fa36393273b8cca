"""asyncps: an asynchronous parameter-server training system on numpy and gRPC.

Public API (docs/own_model.md walks through it):
    asyncps.train(config_or_path, **overrides)    train in this process; returns report.json's dict
    asyncps.launch(config_or_path, **overrides)   shards, workers and chief as processes; the report
    asyncps.autodiff   the tape, Tensor, ops, check_grads: what a model's math is written with
    asyncps.models     Model (the contract every model keeps), initialisers, check_model
    asyncps.data       Dataset / DatasetMeta (what a data loader returns), load_npz, load_csv
    asyncps.config     the config schema (Config, load_config); asyncps.errors: UserError & co.
Everything else is internal: it may change without notice.

Package map (each folder of the repository is one sub-package):
    asyncps          <- common/   code every role shares: config schema, atomic files, run dirs
    asyncps.protos   <- protos/   gRPC messages and the tensor codec
    asyncps.ps       <- ps/       parameter-server shards, server-side optimizers
    asyncps.worker   <- worker/   autodiff engine, models, data, the training worker
    asyncps.chief    <- chief/    membership, evaluation, checkpoints, stopping
    asyncps.cli      <- cli/      the `asyncps` command
"""

__version__ = "0.1.0"

# asyncps.api imports only the standard library and asyncps.errors at import time (the engine,
# numpy and the launcher load inside train/launch), so `import asyncps` stays cheap for the
# CLI and every role process.
from asyncps.api import LaunchError, launch, train  # noqa: E402

__all__ = ["LaunchError", "launch", "train"]
