"""NICE as in the course (4 additive couplings, MLPs of 5 x 1000, logistic prior, no logit), with
the library's training defaults."""

from jaxdnn.trainer import config_dict


def get_config():
    return config_dict("nice")
