"""Training: config schema, the planned and sharded state, the train step, data, the loop."""

from train.config import Config, load_config
from train.errors import ConfigError
from train.plan import Plan, build_state, plan
from train.state import TrainState

__all__ = ["Config", "ConfigError", "Plan", "TrainState", "build_state", "load_config", "plan"]
