"""Config file for running the real scripts on the toy model of tests/toy.py:

  python scripts/predict.py --config tests/toy_config.py --workdir W --images ... --out O

Registers the toy model while the config loads (configs are code), so the CLI end-to-end
tests need no MFuser build."""

from tests.toy import register_toy, toy_config


def get_config(arg=None):
    del arg
    register_toy()
    return toy_config()
