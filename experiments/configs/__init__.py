"""Training recipes, one file a model, the Flax-examples way: `get_config()` returns a flat
`ml_collections.ConfigDict` (`jaxdnn.trainer.config_dict`: the library's defaults, which hold
types and ranges, updated by the recipe's own values). Use:

    python -m experiments.train_flow --config experiments/configs/realnvp.py --config.lr=1e-3
"""
