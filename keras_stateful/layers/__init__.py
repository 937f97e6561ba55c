"""The stateful layers of keras_stateful."""

from keras_stateful.layers.averaged_model import AveragedModel
from keras_stateful.layers.center_loss import CenterLoss
from keras_stateful.layers.fake_quant import FakeQuant
from keras_stateful.layers.memory_bank import MemoryBank
from keras_stateful.layers.memory_queue import MemoryQueue
from keras_stateful.layers.moving_average import MovingAverage
from keras_stateful.layers.moving_moments import MovingMoments
from keras_stateful.layers.percentile_normalization import PercentileNormalization
from keras_stateful.layers.residual_vector_quantizer import ResidualVectorQuantizer
from keras_stateful.layers.running_standardization import RunningStandardization
from keras_stateful.layers.spectral_normalization import SpectralNormalization
from keras_stateful.layers.sync_batch_normalization import SyncBatchNormalization
from keras_stateful.layers.vector_quantizer_ema import VectorQuantizerEMA

__all__ = [
    "AveragedModel",
    "CenterLoss",
    "FakeQuant",
    "MemoryBank",
    "MemoryQueue",
    "MovingAverage",
    "MovingMoments",
    "PercentileNormalization",
    "ResidualVectorQuantizer",
    "RunningStandardization",
    "SpectralNormalization",
    "SyncBatchNormalization",
    "VectorQuantizerEMA",
]
