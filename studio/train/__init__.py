"""One training loop for every adapter family: ``train(config) -> Iterator[Event]`` ending with Done."""

from studio.train.config import TrainConfig, load as load_config
from studio.train.export import Export, to_lora
from studio.train.loop import TrainResult, train

__all__ = ["Export", "TrainConfig", "TrainResult", "load_config", "to_lora", "train"]
