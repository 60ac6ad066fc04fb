"""The errors that mean "the user asked for something that cannot be done": the command line prints
their one-line message and exits with code 2, never a traceback. Each is defined where it is raised."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from condcomp.convert import ConvertError, PretrainedError
    from condcomp.data import DataError
    from condcomp.device import DeviceError
    from condcomp.distributed import DistributedError
    from condcomp.registry import RegistryError
    from condcomp.retrieval.errors import RetrievalError
    from condcomp.routing import RoutingError
    from condcomp.settings import ConfigError
    from condcomp.train import CheckpointError, TrainingError

    return (ConfigError, DataError, CheckpointError, TrainingError, ConvertError, PretrainedError, DistributedError,
            RegistryError, RoutingError, DeviceError, RetrievalError)
