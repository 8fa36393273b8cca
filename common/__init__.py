"""asyncps: an asynchronous parameter-server training system on numpy and gRPC.

Package map (each folder of the repository is one sub-package):
    asyncps          <- common/   code every role shares: config schema, atomic files, run dirs
    asyncps.protos   <- protos/   gRPC messages and the tensor codec
    asyncps.ps       <- ps/       parameter-server shards, server-side optimizers
    asyncps.worker   <- worker/   autodiff engine, models, data, the training worker
    asyncps.chief    <- chief/    membership, evaluation, checkpoints, stopping
    asyncps.cli      <- cli/      the `asyncps` command
"""

__version__ = "0.1.0"
