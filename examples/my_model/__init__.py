"""An example of bringing your own model and data to asyncps (docs/own_model.md).

Run it from the repository root with the folder above this package on PYTHONPATH:

    PYTHONPATH=examples asyncps launch examples/my_model/config.yaml
"""
