"""Training: config schema, sharded state builders, the train step, data, the loop."""

from train.config import Config, ConfigError, load_config
from train.state import TrainState, build_state

__all__ = ["Config", "ConfigError", "load_config", "TrainState", "build_state"]
